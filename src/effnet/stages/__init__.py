"""The pipeline's stages, one module each (demo_data, shard, train, fixres, evaluate, register), and the commands that
use what it publishes (predict, export): each a `run(cfg, paths...) -> Result` over the library below it. A stage
never imports another stage (tests/test_layout.py holds that, and dvc.yaml's deps list what each one imports)."""
