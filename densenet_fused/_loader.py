"""Load the compiled extension ``densenet_fused._C`` (op schemas and CPU/CUDA kernels).

The extension is ABI-bound to the torch it was built against; importing it under another
torch fails here with instructions instead of an undefined-symbol error.
"""
import torch

_REBUILD = (
    "Rebuild it against the installed torch: "
    "`pip install --no-build-isolation --no-deps -e .` in the densenet_fused checkout (or `make install`)."
)

try:
    from . import _build_info
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError("densenet_fused: the C++ extension is not built. " + _REBUILD) from exc

if _build_info.TORCH_VERSION != torch.__version__:
    raise ImportError(
        "densenet_fused: the C++ extension was built against torch %s but torch %s is installed. %s"
        % (_build_info.TORCH_VERSION, torch.__version__, _REBUILD)
    )

from . import _C  # noqa: E402  (registers the densenet_fused:: ops)

WITH_CUDA = bool(_C.WITH_CUDA)
TORCH_VERSION_BUILT = _C.TORCH_VERSION_BUILT
