"""Analyses of measured decodes: the paper's findings, the calibration
split protocol, FLOPs counts, the report's markdown and the figures."""
