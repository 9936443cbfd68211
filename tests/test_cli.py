"""The `mxc` command line, in process (`main([...])`), on a tiny Llama saved with
`save_pretrained` plus a character-level tokenizer: compile -> inspect -> run -> bench, the
greedy text equal to eager PyTorch's, and the errors a user sees (one line, no traceback,
nonzero status). One subprocess checks `python -m mxc.cli --help`."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch

import mxc
from mxc.cli import main

PROMPT = "def fib(n):"


def char_tokenizer():
    """A tokenizer with one token per printable ASCII character (ids 3..99) and <unk>, <s>,
    </s> (0, 1, 2): it fits the tiny Llama's 131-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def cli(*argv: str) -> tuple[int, str, str]:
    """`mxc ARGV` in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model_dir(tiny_llama_factory, tmp_path_factory):
    """A Hugging Face model directory: a tiny Llama (config.json + safetensors) and its tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model = tiny_llama_factory(seed=3)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def artifacts(model_dir, tmp_path_factory):
    """The tiny Llama compiled by the CLI: float, and w4a16-g128 calibrated on 2 windows of
    real text; {name: (path, stdout)}."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name, args in [("float", []), ("w4", ["--plan", "w4a16-g128", "--calibration", 2, "--calibration-seq-len", 32])]:
        code, stdout, stderr = cli("compile", model_dir, "-o", root / name, *args)
        assert code == 0, stderr
        out[name] = (root / name, stdout)
    return out


# --------------------------------------------------------------------------- compile, inspect
def test_compile_saves_an_artifact_and_prints_the_report(artifacts, model_dir):
    path, stdout = artifacts["w4"]
    assert "mxc report: graph @LlamaForCausalLM, backend reference, plan w4a16-g128" in stdout
    assert re.search(r"model\.layers\.1\.mlp\.down_proj\s+int4<asym,g128>", stdout)
    assert f"saved {path} (" in stdout and "with tokenizer" in stdout
    plan = json.loads((path / "plan.json").read_text())
    assert plan["name"] == "w4a16-g128" and plan["method"] == "gptq"  # calibrated: GPTQ, not rounding
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert "tokenizer/tokenizer.json" in files
    assert str(mxc.load(path).report()) in stdout


@pytest.mark.filterwarnings("ignore:tune. the held-out KL rose")  # 3 steps on a random model: either way
def test_compile_with_scale_tuning(model_dir, tmp_path):
    code, stdout, stderr = cli("compile", model_dir, "-o", tmp_path / "t", "--plan", "w4a16-g128", "--tune", 3,
                               "--calibration", 3, "--calibration-seq-len", 32)
    assert code == 0, stderr
    assert json.loads((tmp_path / "t" / "plan.json").read_text())["tune"] == 3
    assert "scales tuned: 14 tensors, 3 steps on 2 windows (64 tokens); held-out KL" in stdout
    assert str(mxc.load(tmp_path / "t").report()) in stdout  # the artifact keeps what tuning did


def test_compile_with_backend_auto_picks_reference_without_a_gpu(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="backend 'auto' picked 'reference': no CUDA GPU is available"):
        code, stdout, stderr = cli("compile", model_dir, "-o", tmp_path / "auto", "--backend", "auto")
    assert code == 0, stderr
    assert "backend reference" in stdout and mxc.load(tmp_path / "auto").backend == "reference"


def test_a_float_artifact_equals_eager_pytorch(artifacts, model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 131, (2, 9))
    with torch.no_grad():
        want = eager(input_ids=ids, use_cache=False).logits
    assert torch.equal(mxc.load(artifacts["float"][0])(ids).logits, want)


def test_inspect_shows_versions_layers_kernels_and_fallbacks(artifacts):
    code, stdout, stderr = cli("inspect", artifacts["w4"][0])
    assert code == 0, stderr
    assert f"written by mxc {mxc.__version__}, torch {torch.__version__}" in stdout
    assert "target: backend reference on cpu; loaded on backend reference" in stdout
    assert "tokenizer: yes" in stdout
    assert re.search(r"model\.layers\.0\.self_attn\.q_proj\s+int4<asym,g128>\s+4\.\d+\s+\d+\.\d", stdout)
    assert "torch fallbacks (not lowered to the op set):" in stdout
    assert "kernels: none stored (backend reference runs PyTorch ops)" in stdout


def test_inspect_lists_stored_kernels(artifacts, tmp_path):
    from mxc.compiled import CompiledModel
    from mxc.runtime import ReferenceExecutor

    class WithKernels(ReferenceExecutor):  # as the Triton backend will report its generated sources
        def kernel_sources(self):
            return {"dequant_gemm_w4_g128.py": "# spec: dequant_gemm int4<asym,g128>\n" * 64}

    m = mxc.load(artifacts["w4"][0])
    path = mxc.save(CompiledModel(m.graph, m.call_spec, WithKernels(m.graph), m.backend, m.timings, m.plan), tmp_path / "k")
    code, stdout, stderr = cli("inspect", path)
    assert code == 0, stderr
    assert re.search(r"kernels: 1\n\s+kernels/dequant_gemm_w4_g128\.py\s+2\.3 KiB\n", stdout), stdout


# --------------------------------------------------------------------------- run, bench
def greedy(model, tokenizer, prompt: str, n: int) -> str:
    """Greedy generation with the eager model, recomputing the whole sequence each step."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            if int(nxt) == tokenizer.eos_token_id:
                break
    return tokenizer.decode(ids[0], skip_special_tokens=True)


def test_run_generates_what_eager_pytorch_generates(artifacts, model_dir):
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    code, stdout, stderr = cli("run", artifacts["float"][0], "--prompt", PROMPT, "--max-new-tokens", 8)
    assert code == 0, stderr
    want = greedy(eager, char_tokenizer(), PROMPT, 8)
    assert stdout == want + "\n" and len(want) > len(PROMPT)


def test_run_a_quantized_artifact(artifacts):
    code, stdout, stderr = cli("run", artifacts["w4"][0], "--prompt", PROMPT, "--max-new-tokens", 4)
    assert code == 0, stderr
    assert stdout.startswith(PROMPT) and len(stdout.rstrip("\n")) > len(PROMPT)


def test_bench_prints_the_median_and_tokens_per_second(artifacts):
    code, stdout, stderr = cli("bench", artifacts["w4"][0], "--batch", 2, "--seq", 8, "--iters", 3, "--warmup", 1)
    assert code == 0, stderr
    m = re.fullmatch(r"backend reference on cpu: batch 2 x seq 8, median ([\d.]+) ms over 3 runs "
                     r"\(min [\d.]+ ms\), ([\d.]+) tokens/s\n", stdout)
    assert m, stdout
    assert float(m[2]) == pytest.approx(16 / (float(m[1]) / 1e3), rel=0.02)


# --------------------------------------------------------------------------- errors
def assert_user_error(result: tuple[int, str, str], status: int, message: str) -> None:
    code, stdout, stderr = result
    assert code == status, (code, stderr)
    assert stderr.startswith("mxc: error: ") and message in stderr, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1


def test_errors_on_bad_paths(artifacts, model_dir, tmp_path):
    assert_user_error(cli("inspect", tmp_path / "missing"), 2, "no such artifact directory")
    assert_user_error(cli("inspect", model_dir), 1, "not an mxc artifact: manifest.json is missing")
    assert_user_error(cli("compile", tmp_path / "missing", "-o", tmp_path / "o"), 2, "no such file or directory")
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    assert_user_error(cli("compile", tmp_path / "m.onnx", "-o", tmp_path / "o"), 2,
                      "not a readable ONNX model")
    assert_user_error(cli("compile", tmp_path, "-o", tmp_path / "o"), 2, "expected a Hugging Face model directory")
    assert_user_error(cli("compile", model_dir, "-o", artifacts["float"][0]), 1,
                      "already holds an artifact; pass overwrite=True (mxc compile --overwrite)")


def test_errors_on_bad_plans(model_dir, tmp_path):
    result = cli("compile", model_dir, "--plan", "w5a16", "-o", tmp_path / "o")
    assert_user_error(result, 2, "--plan w5a16: unknown preset; expected one of w8a8, ")
    assert all(name in result[2] for name in mxc.PRESETS)
    assert_user_error(cli("compile", model_dir, "--plan", tmp_path / "none.json", "-o", tmp_path / "o"), 2,
                      "no such plan file")
    (tmp_path / "bad.json").write_text('{"default": {"weight": "int4<asym,g128>"}, "colour": 1}')
    assert_user_error(cli("compile", model_dir, "--plan", tmp_path / "bad.json", "-o", tmp_path / "o"), 2,
                      "plan has unknown key(s) ['colour']")
    (tmp_path / "gptq.json").write_text('{"default": {"weight": "int4<asym,g128>"}, "method": "gptq"}')
    assert_user_error(cli("compile", model_dir, "--plan", tmp_path / "gptq.json", "--calibration", 0, "-o", tmp_path / "o"),
                      2, "asks for GPTQ, which needs calibration data")
    with pytest.warns(UserWarning, match="no calibration data"):
        code, _, stderr = cli("compile", model_dir, "--plan", "w8a8-static", "--calibration", 0, "-o", tmp_path / "o")
    assert code == 1 and "mxc: error: pass 'quantize' failed" in stderr and "statically, from calibration data" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "o").exists()
    assert_user_error(cli("compile", model_dir, "--tune", 4, "-o", tmp_path / "o"), 2,
                      "--tune 4: expected a count of steps >= 0 and a --plan")
    assert_user_error(cli("compile", model_dir, "--plan", "w4a16-g128", "--tune", 4, "--calibration", 0,
                          "-o", tmp_path / "o"), 2, "asks for 4 steps of scale tuning, which fits the scales on")


def test_errors_on_tampered_artifacts_and_missing_tokenizers(artifacts, tmp_path):
    bare = mxc.save(mxc.load(artifacts["float"][0]), tmp_path / "bare")  # saved without a tokenizer
    assert_user_error(cli("run", bare, "--prompt", "x"), 2, "the artifact holds no tokenizer")
    with open(bare / "weights.safetensors", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert_user_error(cli("inspect", bare), 1, "weights.safetensors: sha256 mismatch")
    assert_user_error(cli("bench", artifacts["float"][0], "--iters", 0), 2, "--iters 0: expected a positive number")
    from mxc.compiled import CompiledModel
    from mxc.signature import CallSpec

    m = mxc.load(artifacts["float"][0])  # the same graph, returning a bare tensor instead of a ModelOutput
    bare_spec = CallSpec(m.call_spec.params, m.call_spec.inputs, m.call_spec.constants, None)
    no_logits = mxc.save(CompiledModel(m.graph, bare_spec, m.executor, m.backend, m.timings, m.plan),
                         tmp_path / "tensor-out", tokenizer=char_tokenizer())
    assert_user_error(cli("run", no_logits, "--prompt", "x"), 2, "the model's outputs have no logits")


def test_argparse_errors_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compile", "model-dir"])  # no -o
    assert e.value.code == 2 and "the following arguments are required: -o/--output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0 and "recomputed each step" in capsys.readouterr().out


def test_python_m_mxc_cli_help():
    done = subprocess.run([sys.executable, "-m", "mxc.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(cmd in done.stdout for cmd in ("compile", "inspect", "run", "bench"))
    assert done.stdout.startswith("usage: mxc ")
