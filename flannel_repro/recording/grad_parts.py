"""The two halves of the tied embedding's gradient, taken where autograd makes them (`record.grad_parts`).

With tied embeddings the one weight W is used twice: by the input lookup (`wte`, rows of the tokens in the batch
only) and by the output projection (`lm_head`, every row, through the softmax). Backward makes one (V, H) gradient
for each use and autograd adds the two into grad_W. `GradParts` puts a hook on each of the two backward nodes that
hand W a gradient, so each half is copied exactly as autograd hands it over (on the model's device, no host wait):

    grad_W_input   the lookup's half (EmbeddingBackward): zero in every row of a token that is not an input
    grad_W_output  the output projection's half (the matmul's weight gradient): every row

The nodes are found anew at every forward pass (a forward hook on each module), as each step builds its own graph.
"""

from __future__ import annotations

import torch

PART_NAMES = ("grad_W_input", "grad_W_output")


def _weight_edge(node, weight: torch.Tensor) -> int | None:
    """The index of `node`'s backward output that goes to `weight`'s gradient accumulator, if any."""
    for i, (child, _) in enumerate(node.next_functions):
        if child is not None and getattr(child, "variable", None) is weight:
            return i
    return None


def _node_feeding(start, weight: torch.Tensor, stop=None):
    """The first node reached from `start` that hands `weight` a gradient, not looking past `stop` (the graph of the
    module's input, which leads to the other use), with its edge index."""
    seen, queue = set(), [start]
    while queue:
        node = queue.pop(0)
        if node is None or node is stop or node in seen:
            continue
        seen.add(node)
        edge = _weight_edge(node, weight)
        if edge is not None:
            return node, edge
        queue += [child for child, _ in node.next_functions]
    raise RuntimeError("record.grad_parts: no backward node hands the tied embedding its gradient")


class GradParts:
    """Forward hooks on the lookup and the output projection that copy each half of grad_W into `buffers`."""

    def __init__(self, model) -> None:
        lookup, projection = model.get_input_embeddings(), model.get_output_embeddings()
        weight = lookup.weight
        if projection is None or projection.weight is not weight:
            raise RuntimeError("record.grad_parts needs tied embeddings (the lookup and the projection share W)")
        self.weight = weight
        self.buffers = {name: torch.zeros(weight.shape, dtype=torch.bfloat16, device=weight.device)
                        for name in PART_NAMES}
        self._handles = [lookup.register_forward_hook(self._on_lookup),
                         projection.register_forward_hook(self._on_projection)]

    def _capture(self, name: str, node, edge: int) -> None:
        def copy(grad_inputs, grad_outputs) -> None:  # runs in backward, before autograd adds the two halves
            self.buffers[name].copy_(grad_inputs[edge])

        node.register_hook(copy)

    def _on_lookup(self, module, args, output) -> None:
        if output.grad_fn is not None:  # None under no_grad (no backward follows)
            self._capture("grad_W_input", *_node_feeding(output.grad_fn, self.weight))

    def _on_projection(self, module, args, output) -> None:
        if output.grad_fn is not None:
            self._capture("grad_W_output", *_node_feeding(output.grad_fn, self.weight, stop=args[0].grad_fn))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
