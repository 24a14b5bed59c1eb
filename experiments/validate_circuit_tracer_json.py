"""Validate crosslayer graph JSON files against circuit-tracer 0.5.0's own pydantic viewer model.

circuit-tracer cannot be installed next to this project (it pins transformers <= 4.57.3, we pin >= 5), so its
``frontend/graph_models.py`` (which needs only pydantic) is loaded by file path from the unpacked wheel:

    pip download circuit-tracer==0.5.0 --no-deps -d /tmp/ctdl && (cd /tmp/ctdl && unzip -q -o *.whl -d src)
    python experiments/validate_circuit_tracer_json.py /tmp/ctdl/src/circuit_tracer/frontend/graph_models.py GRAPH.json ...

Each file is parsed by circuit-tracer's ``Model`` (what ``create_graph_files`` serialises) and dumped again; the
script prints whether the round trip gives back the same nodes, links and metadata.
"""
import importlib.util
import json
import sys

spec = importlib.util.spec_from_file_location("ct_graph_models", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
for path in sys.argv[2:]:
    data = json.load(open(path))
    m = mod.Model.model_validate(data)
    again = json.loads(m.model_dump_json())
    same_nodes = all({k: a[k] for k in a} == {k: b[k] for k in a} for a, b in zip(data["nodes"], again["nodes"]))
    print(path, "valid:", len(m.nodes), "nodes", len(m.links), "links; round trip identical:", same_nodes and data["links"] == again["links"] and data["metadata"] == again["metadata"])
