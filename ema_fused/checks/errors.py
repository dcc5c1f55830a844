"""The error every layer raises when a model no longer matches its EMA."""


class ModelChangedError(RuntimeError):
    """The model no longer has the tensors the EMA was made for."""
