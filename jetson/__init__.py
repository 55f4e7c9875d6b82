"""edge_vila.jetson — JetPack/L4T detection, jtop/tegrastats stats, power modes,
memory budgets for Orin boards, GStreamer camera pipelines. Imports without torch."""
