"""JetStream's own orchestrator (and gRPC server) serving the engine: same greedy tokens.

Runs in a subprocess with one CPU device, as a JetStream server would. Needs the ``jetstream``
extra (``pip install -e '.[jetstream]' && pip install --no-deps google-jetstream==0.2.2``);
skips only when JetStream cannot be imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import asyncio, dataclasses, json
import grpc, jax, portpicker
from flax import nnx
from models.config import preset
from models import build
from mopd_jax.sampling import GREEDY, Engine, rollout
from mopd_jax.sampling.jetstream_adapter import JetStreamEngine, import_jetstream, make_driver, serve

assert len(jax.devices()) == 1, jax.devices()
js = import_jetstream()
pb = js.jetstream_pb2
model = build(preset("tiny"), nnx.Rngs(0))
graphdef, params = nnx.split(model)
engine = Engine(graphdef, params, max_concurrent_decodes=2, max_prefill_length=16,
                max_target_length=48)
prompts = [[5, 6, 7], [9] * 11, [3, 1, 4, 1, 5, 9, 2, 6], [100, 27], [64]]
N = 10
alone = rollout(engine, params, prompts, sampling=dataclasses.replace(GREEDY, max_new_tokens=N))
expected = [alone.tokens[r, alone.prompt_lengths[r]:alone.lengths[r]].tolist()
            for r in range(len(prompts))]

def request(prompt):
    # JetStream 0.2.2 prepends its BOS to fresh requests; the adapter strips it again.
    return pb.DecodeRequest(token_content=pb.DecodeRequest.TokenContent(token_ids=prompt),
                            max_tokens=N)

adapter = JetStreamEngine(engine, params)
driver = make_driver(adapter)
orchestrator = js.orchestrator.LLMOrchestrator(driver=driver)

async def decode(prompt):
    out = []
    async for resp in orchestrator.Decode(request(prompt)):
        out.extend(resp.stream_content.samples[0].token_ids)
    return out

async def decode_all():  # 5 concurrent requests on 2 slots: slots are freed and refilled
    return await asyncio.gather(*[decode(p) for p in prompts])

# JetStream's detokenize thread posts each request's end-of-stream as two separate
# call_soon_threadsafe calls; asyncio.run would close the loop between them and the thread's
# error SIGKILLs the process. Keep the loop open until the driver's threads have joined.
loop = asyncio.new_event_loop()
via_driver = loop.run_until_complete(decode_all())
driver.stop()
loop.close()

port = portpicker.pick_unused_port()
server = serve(adapter, port)
try:
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        stub = js.jetstream_pb2_grpc.OrchestratorStub(channel)
        via_grpc = [[t for resp in stub.Decode(request(p)) for t in
                     resp.stream_content.samples[0].token_ids] for p in prompts]
finally:
    server.stop()
print("RESULT " + json.dumps({"expected": expected, "driver": via_driver, "grpc": via_grpc}))
"""


def _jetstream_importable() -> str | None:
    probe = ("from mopd_jax.sampling.jetstream_adapter import import_jetstream; "
             "import_jetstream()")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                       env=_env(), timeout=120)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one device, unlike the 8-device test process
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_jetstream_orchestrator_serves_engine_greedy_tokens():
    why = _jetstream_importable()
    if why is not None:
        pytest.skip(f"jetstream extra not installed: {why}")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                       text=True, env=_env(), timeout=300)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.returncode, r.stdout[-3000:], r.stderr[-3000:])
    out = json.loads(lines[-1][len("RESULT "):])
    assert all(len(t) == 10 for t in out["expected"])
    assert out["driver"] == out["expected"]
    assert out["grpc"] == out["expected"]
