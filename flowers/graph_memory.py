"""Free a functional model's intermediate tensors once their last consumer has run (eager torch).

Keras 3.15's `Function._run_through_graph` (keras/src/ops/function.py) keeps every tensor it
computes in one dictionary until the whole graph has run. Under tensorflow and jax the graph is
traced once and their runtimes free each buffer after its last use; under eager torch the
dictionary is what holds the tensors, so all of ResNet50's activations of a batch were alive at
once: a forward pass at 224 px, batch 32, peaked at 2.7x the memory of the same network in plain
PyTorch (flowers bench --memory). Upstream master (checked 2026-12) still keeps them.

`install()` replaces that one method with the same loop plus a last-use table (computed once per
model): after a node runs, the tensors no later node reads are dropped, unless they are the
model's outputs. The values computed do not change (tests/test_memory.py compares them bit for
bit). It is installed by backend.select for torch, only on the Keras versions it was checked
against (another version keeps Keras' own method, with one warning line), and
FLOWERS_FREE_INTERMEDIATES=0 leaves it off.
"""

from __future__ import annotations

import os
import sys

# Keras versions whose Function._run_through_graph the replacement below reproduces line for line
VERIFIED_KERAS = ("3.15.0", "3.15.1")
ENV = "FLOWERS_FREE_INTERMEDIATES"


def install() -> bool:
    """Replace Function._run_through_graph (see the module docstring); whether it is installed."""
    if os.environ.get(ENV, "1") == "0":
        return False
    import keras
    from keras.src import tree
    from keras.src.ops import function

    if getattr(function.Function._run_through_graph, "_flowers_frees", False):
        return True
    if keras.version() not in VERIFIED_KERAS:
        print(f"warning: keras {keras.version()} is not one flowers checked its graph-memory fix "
              f"against ({', '.join(VERIFIED_KERAS)}); eager torch keeps every activation of a "
              f"forward pass until it ends (set {ENV}=0 to silence this)", file=sys.stderr)
        return False

    def _run_through_graph(self, inputs, operation_fn=lambda op: op, call_fn=None):
        inputs = tree.flatten(inputs)
        tensor_dict = {}
        for x, y in zip(self.inputs, inputs, strict=False):  # as Keras: zip
            tensor_dict[id(x)] = y
        order, last_use, keep = _plan(self)
        for position, node in enumerate(order):
            if any(id(x) not in tensor_dict for x in node.input_tensors):
                continue  # Node is not computable, try skipping.
            args, kwargs = node.arguments.fill_in(tensor_dict)
            if call_fn is not None:
                op = operation_fn(node.operation)
                outputs = call_fn(op, *args, **kwargs)
            else:
                operation = self._get_operation_for_node(node)
                op = operation_fn(operation)
                outputs = op(*args, **kwargs)
            del args, kwargs
            for x, y in zip(node.outputs, tree.flatten(outputs), strict=False):
                tensor_dict[id(x)] = y
            del outputs
            for x in node.input_tensors:  # what no later node reads
                if last_use[id(x)] == position and id(x) not in keep:
                    tensor_dict.pop(id(x), None)

        output_tensors = []
        for i, x in enumerate(self.outputs):
            if id(x) not in tensor_dict:
                path = tree.flatten_with_path(self._outputs_struct)[i][0]
                path = ".".join(str(p) for p in path)
                raise ValueError(f"Output with path `{path}` is not connected to `inputs`")
            output_tensors.append(tensor_dict[id(x)])
        return tree.pack_sequence_as(self._outputs_struct, output_tensors)

    _run_through_graph._flowers_frees = True
    _run_through_graph.__doc__ = function.Function._run_through_graph.__doc__
    function.Function._run_through_graph = _run_through_graph
    return True


def _plan(graph):
    """(nodes in Keras' execution order, {tensor id: position of its last reader}, output ids).

    Cached on the graph object: its nodes never change after it is built.
    """
    cached = graph.__dict__.get("_flowers_memory_plan")
    if cached is not None:
        return cached
    order = []
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        for node in graph._nodes_by_depth[depth]:
            if node.operation and not node.is_input:
                order.append(node)
    last_use: dict[int, int] = {}
    for position, node in enumerate(order):
        for x in node.input_tensors:
            last_use[id(x)] = position
    plan = (order, last_use, {id(x) for x in graph.outputs})
    graph.__dict__["_flowers_memory_plan"] = plan
    return plan
