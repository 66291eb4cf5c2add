"""GPU telemetry through NVML (utilisation, memory, power), absent on CPU and without nvidia-ml-py."""

from __future__ import annotations

from typing import Any

import torch


class GpuTelemetry:
    """Utilisation, memory in use and power draw of this process's GPU, read through NVML.

    Every field is None when pynvml (package ``nvidia-ml-py``) is missing, there is no GPU, or
    NVML cannot answer; construction and :meth:`read` never raise.
    """

    def __init__(self, device_index: int | None = None) -> None:
        self._nvml: Any = None
        self._handle: Any = None
        if not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # not installed, or no driver NVML can talk to (e.g. ROCm)
            return
        self._nvml = pynvml
        index = torch.accelerator.current_device_index() if device_index is None else device_index
        self._handle = self._find_handle(pynvml, index)
        if self._handle is None:
            self.close()

    @staticmethod
    def _find_handle(pynvml: Any, index: int) -> Any:
        # NVML numbers every GPU on the host while CUDA numbers only CUDA_VISIBLE_DEVICES, so the
        # UUID is the reliable link; the index is a fallback for builds without props.uuid.
        try:
            dev_uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            if dev_uuid is not None:
                return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{dev_uuid}")
        except Exception:
            pass
        try:
            return pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:
            return None

    @property
    def available(self) -> bool:
        """Whether :meth:`read` can return real values."""
        return self._handle is not None

    def read(self) -> dict[str, float | int | None]:
        """``{gpu_util (percent), gpu_mem_bytes (device-wide used), gpu_power_w}``; None if unknown."""
        nv, h = self._nvml, self._handle
        queries = {
            "gpu_util": lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu),
            "gpu_mem_bytes": lambda: int(nv.nvmlDeviceGetMemoryInfo(h).used),
            "gpu_power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,  # NVML reports mW
        }
        out: dict[str, float | int | None] = dict.fromkeys(queries)
        if h is None:
            return out
        # Each query may be unsupported on a given board (power on some consumer cards), so one
        # failure must not hide the others.
        for key, query in queries.items():
            try:
                out[key] = query()
            except Exception:
                pass
        return out

    def close(self) -> None:
        """Shut NVML down; later reads return None fields. Safe to call twice."""
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._nvml = None
        self._handle = None
