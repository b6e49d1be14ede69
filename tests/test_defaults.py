"""One resolver of generation settings for every front-end (``prosa.defaults``): the caller's value, else the
model's generation_config (transformers' reading), else the front-end's documented default — and every front-end
(lm.generate, prosa generate, Chat / prosa chat, the server, the pipeline) really goes through it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prosa
from prosa.defaults import FRONT_ENDS, model_defaults, resolve


def test_precedence_caller_then_model_then_front_end():
    assert resolve({}, {}) == {"temperature": 0.0, "max_new_tokens": 128}
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 40}
    assert resolve(sampling, {}) == {"temperature": 0.6, "top_k": 50, "top_p": 0.9, "max_new_tokens": 40}
    assert resolve(sampling, {"temperature": 0.0, "top_k": None})["temperature"] == 0.0      # the caller wins
    assert resolve(sampling, {"top_k": None})["top_k"] == 50                                  # None = not given
    # transformers' reading: sampling keys count only when do_sample is true; penalties count either way
    assert model_defaults({"temperature": 0.3, "top_k": 5, "repetition_penalty": 1.3}) == {"repetition_penalty": 1.3}
    assert model_defaults({"do_sample": False, "temperature": 0.3}) == {"temperature": 0.0}
    assert resolve({}, {}, "openai") == {"temperature": 1.0, "top_p": 1.0}
    assert resolve({"do_sample": False}, {}, "openai")["temperature"] == 0.0
    assert resolve({}, {}, "pipeline") == {"temperature": 0.7, "top_k": 50, "max_new_tokens": 256}


def test_the_pipeline_table_is_the_pipeline_front_end_row():
    from prosa.pipeline.genconfig import GLOBAL_DEFAULTS, PIPELINE_DEFAULTS

    row = FRONT_ENDS["pipeline"]
    assert PIPELINE_DEFAULTS == {"max_new_tokens": row["max_new_tokens"], "do_sample": True,
                                 "temperature": row["temperature"]}
    assert GLOBAL_DEFAULTS["top_k"] == row["top_k"]


@pytest.fixture(scope="module")
def models(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama as it is (its generation_config says nothing of sampling) and a copy whose
    generation_config samples."""
    silent = tiny_checkpoint("llama")
    sampling = tmp_path_factory.mktemp("sampling-llama") / "m"
    shutil.copytree(silent, sampling)
    gc = json.loads((silent / "generation_config.json").read_text()) if (silent / "generation_config.json").exists() \
        else {}
    gc = {k: v for k, v in gc.items() if k not in ("do_sample", "temperature", "top_k", "top_p")}
    (sampling / "generation_config.json").write_text(json.dumps({**gc, "do_sample": True, "temperature": 0.6,
                                                                 "top_p": 0.9, "max_new_tokens": 6}))
    return {"silent": silent, "sampling": sampling}


def cli_settings(model: Path, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "prosa", "generate", "Once upon", "-m", str(model), "--json",
                        "--seed", "3", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[0])["settings"]


@pytest.mark.parametrize("which", ["silent", "sampling"])
def test_every_front_end_resolves_the_same(models, which):
    from prosa.chat.prompt import _options
    from prosa.chat.reply import _plan
    from prosa.serve.convert import _settings
    from prosa.serve.protocol import CompletionRequest

    lm = prosa.load(models[which], dtype="float32")
    expected = resolve(lm.generation_config, {})
    # lm.generate (and lm.stream, Chat: they build requests the same way)
    got = lm.generate("Once upon", seed=3).settings
    assert got["temperature"] == expected["temperature"]
    assert got["max_new_tokens"] == expected["max_new_tokens"]
    assert got["top_k"] == expected.get("top_k", 0) and got["top_p"] == expected.get("top_p", 1.0)
    # prosa generate: the same record, run as a user would
    assert {k: v for k, v in cli_settings(models[which]).items() if k not in ("seed", "model")} == \
        {k: v for k, v in json.loads(json.dumps(got)).items() if k not in ("seed", "model")}
    # Chat: greedy or not, and the reply's length limit, from the same resolver
    plan = _plan(lm, [{"role": "user", "content": "hi"}], _options(lm, None, None, "You", "Bot"), {}, print)
    assert plan.greedy == (expected["temperature"] == 0)
    assert plan.kwargs["max_new_tokens"] == expected["max_new_tokens"]
    # the server: OpenAI's defaults only where the model says nothing
    server = _settings(lm, CompletionRequest(model="m", prompt="hi"), 16)
    assert server["temperature"] == resolve(lm.generation_config, {}, "openai")["temperature"]
    assert server["temperature"] == (1.0 if which == "silent" else 0.6)
    # and the caller always wins
    assert lm.generate("Once upon", seed=3, temperature=0.0, max_new_tokens=2).settings["temperature"] == 0.0
    assert cli_settings(models[which], "--temperature", "0.8")["temperature"] == 0.8
