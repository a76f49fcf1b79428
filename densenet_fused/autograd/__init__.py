"""The autograd Functions: one node per fused module (the dense block, a transition with the block
after it, the transition, the stem, the head) and what they share (the batch statistics over a
process group, distributed.py).  They run the ops (densenet_fused.ops) and never import the modules
(densenet_fused.modules) that call them."""
