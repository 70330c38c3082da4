"""Reads which op types a SavedModel on disk holds (graph and function library)."""

import os


def saved_op_types(path):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    types = set()
    for meta in proto.meta_graphs:
        types.update(node.op for node in meta.graph_def.node)
        for function in meta.graph_def.library.function:
            types.update(node.op for node in function.node_def)
    return types


def custom_op_types(path):
    return sorted(t for t in saved_op_types(path) if t.startswith("KerasSapa"))
