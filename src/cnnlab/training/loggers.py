"""What the processes of a DDP run other than the first log to: nothing, through Lightning's logger interface."""

from __future__ import annotations

from pytorch_lightning.loggers import Logger


class NoClient:
    """Takes any MlflowClient call and does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class OtherProcessLogger(Logger):
    """What the processes of a DDP run other than the first hold instead of an MLflow logger.

    Lightning's MLflow logger connects to the store as it is made (MLflow opens, and for a new
    SQLite file migrates, the database), in every process; only the first process writes the run,
    so the others must not touch the store at all. Callbacks that log (the learning rate) still find a
    logger, which keeps nothing.
    """

    name, version, run_id, experiment_id = "mlflow", None, None, None

    @property
    def experiment(self) -> NoClient:
        return NoClient()

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

