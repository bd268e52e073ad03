"""The domain errors of lorafleet. Messages say what was expected, what was found, and where."""


class LoraFleetError(Exception):
    """Base class of every error lorafleet raises on purpose."""


class ConfigError(LoraFleetError):
    """A configuration value is missing or invalid (names the field)."""


class ModelLoadError(LoraFleetError):
    """A base-model checkpoint folder cannot be read (names the file or key)."""


class AdapterError(LoraFleetError):
    """An adapter file or folder is invalid or does not fit the model (names the key)."""


class ShapeError(AdapterError):
    """A tensor has the wrong shape (names the key, the expected and the found shape)."""


class TargetError(LoraFleetError):
    """A LoRA target matches no module (lists a sample of the names that exist)."""


class DataError(LoraFleetError):
    """Training data is malformed (names the file and line)."""


class TrainingError(LoraFleetError):
    """A training run cannot go on (NaN loss, existing output folder...)."""


class EngineError(LoraFleetError):
    """The serving engine cannot take a request (unknown adapter, too long, ...)."""


class RequestError(EngineError):
    """One request is invalid; the engine keeps serving the others."""


class SamplingError(ConfigError, RequestError):
    """A sampling parameter is invalid (names the field): a configuration error to a caller of
    `generate`, a request error to the engine, which refuses only that request."""
