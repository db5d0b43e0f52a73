"""Analyses of a network that need no training: what it costs, part by part."""

from .cost import CostRow, count_macs, format_table, stage_costs, write_table

__all__ = ["CostRow", "count_macs", "format_table", "stage_costs", "write_table"]
