"""Data stages: demo data, sharding to webdataset tars, streaming them into training."""
