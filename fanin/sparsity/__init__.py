"""Dynamic sparse training: layer-wise distributions (uniform, ERK), SRigL and the RigL/static baselines."""
from fanin.sparsity.distribution import check_sparsity, drop_fraction, layer_densities
from fanin.sparsity.rigl import RigL, masked_layers, rigl_masks
from fanin.sparsity.srigl import SRigL, dense_shape, sparse_layers, srigl_update

__all__ = ["SRigL", "RigL", "srigl_update", "rigl_masks", "layer_densities", "drop_fraction", "check_sparsity",
           "sparse_layers", "masked_layers", "dense_shape"]
