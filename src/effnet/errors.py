class EffnetError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback, and exits with
    `exit_code`."""

    exit_code = 2


class Preempted(EffnetError):
    """The run stopped on SIGTERM after saving its checkpoint: running the stage again resumes it. Exit status 143
    (128 + SIGTERM), which schedulers count as a signal, not a failure of the job (Kubeflow's ExitCode policy
    restarts it)."""

    exit_code = 143
