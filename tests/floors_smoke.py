"""Run by tests/test_dependency_floors.py inside the environment of minimum versions: the server imports, and
the engine serves a tiny model exactly as `generate()` does on those versions."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import genserve.service.server  # noqa: E402, F401 - the import itself is the check: generated code, grpc, protobuf
from genserve.scheduler.model.loader import LoadedModel  # noqa: E402
from tests.conftest import StepDriver, hf_generate, tiny_model  # noqa: E402
from tests.references import with_plain_reference  # noqa: E402

loaded = LoadedModel(with_plain_reference(tiny_model()), None, "tiny")
driver = StepDriver(loaded, max_running=2)
for index, prompt in enumerate(([5, 6, 7], [9, 10, 11, 12, 13])):
    driver.submit(f"r{index}", prompt, max_new_tokens=8)
driver.run()
for index, prompt in enumerate(([5, 6, 7], [9, 10, 11, 12, 13])):
    expected = hf_generate(loaded.model, prompt, driver.engine.make_parameters(max_new_tokens=8))
    assert driver.tokens[f"r{index}"] == expected, index
print("ok")
