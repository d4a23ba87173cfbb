"""Modules on top of fastdg.ops: BIN layers (a drop-in for BatchNorm2d) and the GroupDRO loss."""
from .bin import (BatchInstanceNorm2d, bin_layers, bin_param_groups, clamp_rho_, convert_bin, hold_running_stats,
                  rho_parameters)
from .group_dro import GroupDROLoss

__all__ = ["BatchInstanceNorm2d", "convert_bin", "clamp_rho_", "bin_param_groups", "bin_layers", "rho_parameters",
           "hold_running_stats", "GroupDROLoss"]
