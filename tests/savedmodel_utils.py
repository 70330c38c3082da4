"""Reads which nodes a SavedModel on disk holds (graph and function library): their op
types and names."""

import os


def saved_nodes(path):
    """Every node of the SavedModel at ``path``: its graphs' and its functions'."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    nodes = []
    for meta in proto.meta_graphs:
        nodes.extend(meta.graph_def.node)
        for function in meta.graph_def.library.function:
            nodes.extend(function.node_def)
    return nodes


def saved_op_types(path):
    return {node.op for node in saved_nodes(path)}


def custom_op_types(path):
    return sorted(t for t in saved_op_types(path) if t.startswith("KerasSapa"))
