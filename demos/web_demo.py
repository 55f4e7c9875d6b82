"""The gradio web demo as a script (same as `edge-vila demo BUNDLE`).

    python demos/web_demo.py BUNDLE [--port 7860]
"""
import argparse

import edge_vila
from edge_vila.demo import launch

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    a = ap.parse_args()
    launch(edge_vila.load(a.bundle), host=a.host, port=a.port)
