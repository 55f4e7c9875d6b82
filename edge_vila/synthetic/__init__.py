"""The synthetic shapes world (scenes, captions, checkable questions), its held-out text and
its eval: one dataset shared by training, INT8/AWQ calibration, the export report, the
`synthetic://` camera and the tests. Numpy + Pillow only; the eval drives the runtime API."""
