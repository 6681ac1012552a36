"""Methods that end their own process, for the Ray executor's retry tests (never run them in-process:
they would end the test session)."""
import os
from pathlib import Path

from qcard.methods.base import Method, MethodParams, QuantResult
from user_methods import not_quantized


class DieOnce(Method):
    """Kills its worker process on the first attempt (a marker file remembers it), then leaves the
    model as it is; always: kills it on every attempt."""
    name = "die_once"
    family = "other"

    class Params(MethodParams):
        marker: str = ""
        always: bool = False

    def apply(self, model, data, params, ctx):
        marker = Path(params.marker)
        if params.always or not marker.exists():
            marker.touch()
            os._exit(1)          # as the OOM killer or a lost node would end it: no exception, no card
        return QuantResult(model=model, quantization=not_quantized(), pipeline=["keep"], layers=[], stats={})


class Hold(Method):
    """Leaves the model as it is, holding its worker for `delay` seconds; as it starts it writes a file named
    after the Ray node it runs on into `folder` (a test sees where a point runs, and when)."""
    name = "hold"
    family = "other"

    class Params(MethodParams):
        folder: str = ""
        delay: float = 0.0
        tag: int = 0             # tells the points of a sweep apart

    def apply(self, model, data, params, ctx):
        import time
        import ray
        node = ray.get_runtime_context().get_node_id()
        Path(params.folder, f"{node}.{time.time_ns()}").touch()
        time.sleep(params.delay)
        return QuantResult(model=model, quantization=not_quantized(), pipeline=["keep"], layers=[], stats={})
