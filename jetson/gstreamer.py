"""GStreamer pipeline strings for Jetson cameras and hardware-decoded streams (OpenCV appsink).

`appsink drop=true max-buffers=1` keeps only the newest frame inside GStreamer too, so a
slow consumer never builds a queue. The strings are tested here; running them needs a
Jetson (nvarguscamerasrc, nvvidconv, nvv4l2decoder) and OpenCV built with GStreamer.
"""
from __future__ import annotations

_SINK = "videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30, flip: int = 0) -> str:
    """A CSI camera (IMX219/IMX477...) through the Argus ISP, converted to BGR for OpenCV."""
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1,format=NV12 ! "
            f"nvvidconv flip-method={flip} ! video/x-raw,format=BGRx ! {_SINK}")


def rtsp_pipeline(url: str, latency_ms: int = 200, codec: str = "h264") -> str:
    """RTSP decoded by the Jetson's NVDEC (nvv4l2decoder) instead of the CPU."""
    if codec not in ("h264", "h265"):
        raise ValueError(f"codec {codec!r} unsupported (expected h264 or h265)")
    depay, parse = ("rtph264depay", "h264parse") if codec == "h264" else ("rtph265depay", "h265parse")
    return (f"rtspsrc location={url} latency={latency_ms} ! {depay} ! {parse} ! nvv4l2decoder ! "
            f"nvvidconv ! video/x-raw,format=BGRx ! {_SINK}")


__all__ = ["csi_pipeline", "rtsp_pipeline"]
