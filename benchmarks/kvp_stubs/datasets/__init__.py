"""Stand-in for Hugging Face ``datasets`` in kvpress's benchmark environment (``.kvp/stubs``, see
``benchmarks/make_kvp_env.sh``).

kvpress 0.5.5 imports ``datasets.load_dataset`` at import time (DuoAttentionPress and ExpectedAttentionStatsPress
load calibration data with it), but the ``kvpress_decode`` worker never calls it, and the real package (with pyarrow
and pandas) is far too large to carry to the GPU machine. Anything used from here raises.
"""

__version__ = "0.0.0"


class StubUsedError(RuntimeError):
    """Raised by every entry point of this stand-in."""


def load_dataset(*args: object, **kwargs: object) -> None:
    raise StubUsedError("datasets is a stub in squeezekv's kvpress benchmark environment (.kvp/stubs): "
                        f"load_dataset{args!r} needs the real package (pip install datasets)")


def __getattr__(name: str) -> object:
    if name.startswith("__"):
        raise AttributeError(name)
    raise StubUsedError(f"datasets.{name} is not available: datasets is a stub in squeezekv's kvpress benchmark "
                        "environment (.kvp/stubs); install the real package to use it")
