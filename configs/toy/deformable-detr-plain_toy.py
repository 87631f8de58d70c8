# The toy Deformable DETR without its two variants (no iterative box
# refinement, single stage): the paper's plain model at the toy size, for
# the convergence study. Everything else is configs/toy/deformable-detr_toy.py.
_base_ = './deformable-detr_toy.py'

model = dict(with_box_refine=False, as_two_stage=False)
