"""End to end: `model.py` and `serve.py` as a user runs them."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import (
    LM_TINY_CORPUS,
    LM_TINY_FLAGS,
    REPO_ROOT,
    load_script,
    run_script,
    script_env,
)

from moe.lm import cli
from moe.lm.bundle import save_load
from moe.lm.bundle.folder import OutputLock, check_output
from moe.lm.serving.predictor import NextWordPredictor
from moe.lm.training import train
from moe.lm.training.config import TrainingConfig


def test_train_then_serve_end_to_end(lm_trained, lm_corpus_file):
    out, result = lm_trained
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("vocabulary ") and f"saved to {out}" in summary
    assert "Epoch 2/2" in result.stdout  # Keras's progress output
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.keras", "tokenizer.json", "max_seq_len.txt", "training.json",
         "training.png", "experts.png", "expert_words.png"]
    )  # fmt: skip
    assert (out / "max_seq_len.txt").read_text().strip() == "3"
    training = json.loads((out / "training.json").read_text())
    assert training["config"]["corpus"] == [str(lm_corpus_file)]
    assert set(training["validation"]) == {
        "loss", "accuracy", "top5_accuracy", "perplexity",
    }  # fmt: skip
    assert {"keras", "tensorflow", "numpy"} <= set(training["versions"])
    assert "trained_at" in training
    # model.py chose TensorFlow's BFC allocator for the user.
    assert training["runtime"] == {"tf_cpu_allocator": "bfc"}

    predictor = NextWordPredictor.load(out)
    vocabulary = set(predictor.tokenizer.vocabulary)
    queries = ["the cat sat on", "how are", "qqq"]
    cli = run_script("serve.py", "--model-dir", out, *queries)
    assert cli.returncode == 0, cli.stderr
    assert cli.stderr == ""
    answers = cli.stdout.splitlines()
    assert answers == predictor.predict_next(queries)
    assert set(answers) <= vocabulary

    piped = run_script(
        "serve.py", "--model-dir", out, input="the cat\n\nhow are\n"
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.splitlines() == [
        predictor.predict_next("the cat"),
        "",  # a blank line gets a blank answer: lines stay aligned
        predictor.predict_next("how are"),
    ]

    top = run_script("serve.py", "--model-dir", out, "--top", "3", "the")
    words = top.stdout.split()[::2]
    assert [w for w, _ in predictor.top("the", 3)] == words

    gen = run_script("serve.py", "--model-dir", out, "--generate", "3", "the")
    assert gen.stdout.strip() == "the " + " ".join(predictor.generate("the", 3))

    ev = run_script("serve.py", "--model-dir", out, "--eval", lm_corpus_file)
    assert ev.returncode == 0, ev.stderr
    m = predictor.evaluate(LM_TINY_CORPUS)
    assert (
        f"{m['pairs']} pairs | top-1 accuracy {m['accuracy']:.4f} | top-5 "
        f"accuracy {m['top5_accuracy']:.4f} | perplexity "
        f"{m['perplexity']:.2f}"
    ) in ev.stdout


def test_flags_map_one_to_one_to_config():
    config = cli.parse_training_args(
        ["--top-k", "1", "--capacity-factor", "1.5"]
    )
    assert config == TrainingConfig(top_k=1, capacity_factor=1.5)


def test_the_documented_flags_exist():
    # docs/app.md lists the most-used flags and defers to --help for the
    # rest: each one it lists must be a real flag.
    docs = (REPO_ROOT / "docs" / "app.md").read_text()
    table = docs.split("## Training: `python model.py`")[1].split("\n\n")[2]
    listed = re.findall(r"^\| `(--[a-z-]+)", table, re.MULTILINE)
    assert len(listed) == 10
    flags = set(cli.training_parser()._option_string_actions)
    assert set(listed) <= flags, set(listed) - flags


BLOCK_TENSORFLOW = """
import runpy, sys
# Importing any of these now fails: the run must not need them.
for name in ("keras", "tensorflow", "jax", "torch"):
    sys.modules[name] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["model.py", "--help"], None),
        (["model.py", "--epochs", "x"], "invalid int value"),
        (["model.py", "--epochs", "0"], "--epochs must be at least 1"),
        (["model.py", "--corpus", "missing.txt"], "file not found"),
        (["model.py", "--output", "model.py"], "is a file"),
        (["model.py", "--learning-rate", "inf"], "must be a finite number"),
        (
            ["model.py", "--num-experts", "10000", "--hidden-dim", "100000"],
            "GiB to train (128,000,000,",  # before the model is built
        ),
        (["serve.py", "--model-dir", "missing", "hi"], "no trained model"),
        (["serve.py", "--http", "--port", "70000"], "--port must be 0-65535"),
        (
            ["serve.py", "--model-dir", "missing", "--generate", "0", "hi"],
            "--generate must be between 1 and 10000",
        ),
        (
            ["serve.py", "--model-dir", "missing", "--temperature", "0", "hi"],
            "--temperature must be a finite number > 0",
        ),
    ],
)
def test_cheap_checks_answer_before_tensorflow_loads(argv, expected):
    # Keras (and so TensorFlow) cannot be imported in this run: these
    # answers come from checks that need neither.
    result = run_script("-c", BLOCK_TENSORFLOW, *argv, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    if expected is None:
        assert result.returncode == 0 and "--hidden-dim" in result.stdout
    else:
        assert result.returncode in (1, 2)
        assert expected in result.stderr.strip().splitlines()[-1]


def _validation_corpus_cases(tmp, corpus_file):
    (tmp / "empty.txt").write_text("")
    (tmp / "one_word.txt").write_text("hello.")
    (tmp / "copy.txt").write_text(corpus_file.read_text())
    out = ["--output", str(tmp / "never_written")]
    train = ["model.py", *out, "--corpus", corpus_file, "--validation-corpus"]
    return {
        "missing": ([*train, tmp / "nope.txt"], "file not found"),
        "empty": (
            [*train, tmp / "empty.txt"],
            "--validation-corpus " + str(tmp / "empty.txt") + " has no word "
            "to predict (0 word(s)",
        ),
        "one_word": ([*train, tmp / "one_word.txt"], "has no word to predict"),
        "the_training_file": (
            [*train, corpus_file],
            "is also training text (--corpus)",
        ),
        "a_copy_of_it": ([*train, tmp / "copy.txt"], "is also training text"),
        "with_split": (
            [*train, tmp / "copy.txt", "--validation-split", "0.1"],
            "--validation-split holds out the end of --corpus; "
            "--validation-corpus holds out its files instead",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "empty", "one_word", "the_training_file", "a_copy_of_it",
     "with_split"],
)  # fmt: skip
def test_validation_corpus_is_checked_before_tensorflow_loads(
    tmp_path, lm_corpus_file, case
):
    argv, expected = _validation_corpus_cases(tmp_path, lm_corpus_file)[case]
    result = run_script("-c", BLOCK_TENSORFLOW, *argv, timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("model.py: error: ") and expected in last, last


def test_same_seed_same_vocabulary_and_metrics(tmp_path, lm_corpus_file):
    runs = []
    for name in ("a", "b"):
        config = cli.parse_training_args(
            ["--corpus", str(lm_corpus_file), "--output", str(tmp_path / name)]
            + LM_TINY_FLAGS
        )
        runs.append(train.train(config, verbose=0))
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_text()
    assert runs[0]["validation"] == runs[1]["validation"]
    assert runs[0]["history"] == runs[1]["history"]


# --- bad input: one line on stderr, non-zero exit, nothing overwritten ------


def _bad_inputs(tmp, bundle_dir):
    """name -> (argv, expected stderr fragment)."""
    files = {
        "empty.txt": b"",
        "one_word.txt": b"hello",
        "punctuation.txt": b"... !!! ???",
        "binary.bin": b"\x7fELF\x00\x00\x01",
        "latin1.txt": "caf\xe9 cr\xe8me".encode("latin-1"),
        "utf16.txt": "the cat sat. the dog sat.".encode("utf-16"),
        "a_file": b"",
    }
    for name, content in files.items():
        (tmp / name).write_bytes(content)

    def broken_bundle(name, breaker):
        path = tmp / name
        shutil.copytree(bundle_dir, path)
        breaker(path)
        return path

    partial = broken_bundle(
        "partial", lambda p: (p / "tokenizer.json").unlink()
    )
    corrupt_model = broken_bundle(
        "corrupt_model", lambda p: (p / "model.keras").write_bytes(b"junk")
    )
    corrupt_tok = broken_bundle(
        "corrupt_tok", lambda p: (p / "tokenizer.json").write_text("{")
    )
    mismatch = broken_bundle(
        "mismatch", lambda p: (p / "max_seq_len.txt").write_text("7")
    )
    superscript = broken_bundle(
        "superscript", lambda p: (p / "max_seq_len.txt").write_text("²")
    )
    nested = broken_bundle(
        "nested",
        lambda p: (p / "tokenizer.json").write_text("[" * 10**5 + "]" * 10**5),
    )
    model = bundle_dir / "model.keras"
    truncated = broken_bundle(
        "truncated",
        lambda p: (p / "model.keras").write_bytes(
            model.read_bytes()[: model.stat().st_size // 2]
        ),
    )
    serve = ["serve.py", "--model-dir", bundle_dir]
    out = ["--output", str(tmp / "never_written")]
    train = ["model.py", *out, "--corpus"]
    return {
        "missing_corpus": ([*train, tmp / "nope.txt"], "file not found"),
        "empty_corpus": ([*train, tmp / "empty.txt"], "0 word(s)"),
        "one_word": ([*train, tmp / "one_word.txt"], "1 word(s)"),
        "no_words": ([*train, tmp / "punctuation.txt"], "0 word(s)"),
        "binary": ([*train, tmp / "binary.bin"], "binary"),
        "not_utf8": ([*train, tmp / "latin1.txt"], "not valid utf-8"),
        "zero_experts": (["model.py", *out, "--num-experts", "0"], "experts"),
        "top_k_gt_experts": (
            ["model.py", *out, "--num-experts", "2", "--top-k", "3"],
            "--top-k must be between 1 and --num-experts (2)",
        ),
        "hierarchical_no_groups": (
            ["model.py", *out, "--routing", "hierarchical"],
            "needs --num-groups",
        ),
        "groups_not_dividing": (
            ["model.py", *out, "--routing", "hierarchical", "--num-groups=3"],
            "divides --num-experts (4)",
        ),
        "expert_choice_top_k": (
            ["model.py", *out, "--routing", "expert_choice", "--top-k", "2"],
            "leave --top-k unset",
        ),
        "zero_epochs": (["model.py", *out, "--epochs", "0"], "--epochs"),
        "bad_split": (
            ["model.py", *out, "--validation-split", "1"],
            "--validation-split",
        ),
        "zero_batch": (["model.py", *out, "--batch-size", "0"], "--batch"),
        "no_model": (
            ["serve.py", "--model-dir", tmp / "none", "hi"],
            "no trained model in",
        ),
        "partial_model": (
            ["serve.py", "--model-dir", partial, "hi"],
            "missing tokenizer.json",
        ),
        "corrupt_model": (
            ["serve.py", "--model-dir", corrupt_model, "hi"],
            "not a complete .keras archive",
        ),
        "corrupt_tokenizer": (
            ["serve.py", "--model-dir", corrupt_tok, "hi"],
            "corrupt",
        ),
        "mismatched_bundle": (
            ["serve.py", "--model-dir", mismatch, "hi"],
            "bundle mismatch",
        ),
        "empty_query": (["serve.py", "--model-dir", bundle_dir, " "], "empty"),
        "no_word_query": (
            ["serve.py", "--model-dir", bundle_dir, "?!"],
            "empty query",
        ),
        "utf16_without_encoding": (
            [*train, tmp / "utf16.txt"],
            "is not valid utf-8 text (byte 0); pass --encoding",
        ),
        "capacity_inf": (
            ["model.py", *out, "--capacity-factor", "inf"],
            "--capacity-factor must be a finite number",
        ),
        "seed_negative": (
            ["model.py", *out, "--seed", "-1"],
            "--seed must be between 0 and 4294967295",
        ),
        "tensorboard_file": (
            ["model.py", *out, "--tensorboard", tmp / "a_file"],
            "--tensorboard must be a folder, not a file",
        ),
        "huge_hidden_dim": (
            ["model.py", *out, "--hidden-dim", "100000000"],
            "GiB to train",
        ),
        "long_context": (
            ["model.py", *out, "--max-seq-len", "100000"],
            "--max-seq-len must be between 1 and 1024",
        ),
        "superscript_max_seq_len": (
            ["serve.py", "--model-dir", superscript, "hi"],
            "max_seq_len.txt: expected a whole number from 1 to 1024, "
            "found '²'",
        ),
        "nested_tokenizer": (
            ["serve.py", "--model-dir", nested, "hi"],
            "nested too deeply",
        ),
        "truncated_model": (
            ["serve.py", "--model-dir", truncated, "hi"],
            "not a complete .keras archive",
        ),
        "top_too_big": (
            [*serve, "--top", "100000", "hi"],
            "--top must be between 1 and",
        ),
        "generate_too_long": (
            [*serve, "--generate", "100000", "hi"],
            "--generate must be between 1 and 10000",
        ),
        "temperature_nan": (
            [*serve, "--generate", "2", "--temperature", "nan", "hi"],
            "--temperature must be a finite number > 0",
        ),
        "temperature_zero": (
            [*serve, "--generate", "2", "--temperature", "0", "hi"],
            "--temperature must be a finite number > 0",
        ),
        "eval_missing_file": (
            ["serve.py", "--model-dir", bundle_dir, "--eval", tmp / "x.txt"],
            "file not found",
        ),
    }


ALL_BAD_INPUTS = [
    "missing_corpus", "empty_corpus", "one_word", "no_words", "binary",
    "not_utf8", "zero_experts", "top_k_gt_experts", "hierarchical_no_groups",
    "groups_not_dividing", "expert_choice_top_k", "zero_epochs",
    "bad_split", "zero_batch", "no_model", "partial_model", "corrupt_model",
    "corrupt_tokenizer", "mismatched_bundle", "empty_query", "no_word_query",
    "eval_missing_file", "utf16_without_encoding", "capacity_inf",
    "seed_negative", "tensorboard_file", "huge_hidden_dim", "long_context",
    "superscript_max_seq_len", "nested_tokenizer", "truncated_model",
    "top_too_big", "generate_too_long", "temperature_nan", "temperature_zero",
]  # fmt: skip
# A subprocess that loads TensorFlow takes seconds, so every case runs
# through `main()` in-process and one case per kind of error also as a real
# CLI (most of them answer before TensorFlow loads).
SUBPROCESS_BAD_INPUTS = [
    "missing_corpus", "not_utf8", "zero_experts", "corrupt_model",
    "empty_query", "capacity_inf", "seed_negative", "truncated_model",
    "nested_tokenizer",
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, lm_trained):
    tmp = tmp_path_factory.mktemp("bad_input")
    cases = _bad_inputs(tmp, lm_trained[0])
    assert sorted(cases) == sorted(ALL_BAD_INPUTS)
    yield cases
    assert not (tmp / "never_written").exists()


def check_one_line_error(code, stdout, stderr, expected):
    assert code != 0
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert expected in lines[0]
    assert stdout == ""


@pytest.mark.parametrize("name", ALL_BAD_INPUTS)
def test_bad_input_via_main(bad_inputs, name, capsys):
    argv, expected = bad_inputs[name]
    code = load_script(argv[0]).main([str(a) for a in argv[1:]])
    captured = capsys.readouterr()
    check_one_line_error(code, captured.out, captured.err, expected)


def test_bad_input_via_cli(bad_inputs):
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(run_script, *bad_inputs[name][0])
            for name in SUBPROCESS_BAD_INPUTS
        }
        for name, future in futures.items():
            r = future.result()
            check_one_line_error(
                r.returncode, r.stdout, r.stderr, bad_inputs[name][1]
            )


@pytest.mark.parametrize(
    "argv, first_check",
    [
        (["model.py", "--epochs", "1"], "validate"),
        (["serve.py", "hi"], "check_args"),
    ],
)
def test_a_bug_is_not_a_user_error(argv, first_check, monkeypatch):
    # Only a `UserError` is one line on stderr; any other exception, even a
    # ValueError, is a bug and reaches the caller with its traceback.
    script = load_script(argv[0])

    def bug(*_):
        raise ValueError("a bug, not a bad flag")

    monkeypatch.setitem(script.main.__globals__, first_check, bug)
    with pytest.raises(ValueError, match="a bug"):
        script.main(argv[1:])


def test_interrupted_training_keeps_the_old_bundle(tmp_path, lm_trained):
    target = tmp_path / "saved_model"
    shutil.copytree(lm_trained[0], target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    corpus = tmp_path / "c.txt"
    corpus.write_text(LM_TINY_CORPUS * 20)
    proc = subprocess.Popen(
        [sys.executable, "model.py", "--corpus", corpus, "--output", target,
         "--epochs", "100", "--batch-size", "4"],
        cwd=REPO_ROOT, env=script_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("Epoch 1/"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.strip().splitlines() == [
        f"model.py: interrupted; {target} left unchanged"
    ]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden == [".saved_model.lock"]  # no temporary folder left
    assert save_load.load_bundle(target).max_seq_len == 3


def test_an_interrupt_python_dropped_still_stops_training(
    tmp_path, lm_corpus_file
):
    # A KeyboardInterrupt raised inside a finalizer (`__del__`) is printed
    # and dropped by Python, and training would go on to save. `model.py`'s
    # Ctrl-C handler also sets `train`'s `interrupted` event: here it is set
    # with no exception at all, and training must still stop before saving.
    import threading

    import keras

    output = tmp_path / "saved_model"
    config = cli.parse_training_args(
        ["--corpus", str(lm_corpus_file), "--output", str(output)]
        + LM_TINY_FLAGS
    )
    interrupted = threading.Event()
    lost_interrupt = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: interrupted.set()
    )
    with pytest.raises(KeyboardInterrupt):
        train.train(
            config, verbose=0, callbacks=[lost_interrupt],
            interrupted=interrupted,
        )  # fmt: skip
    assert not output.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".saved_model.lock"]


def test_dropped_interrupts_are_not_reported_as_errors(capsys, monkeypatch):
    # While training, `sys.unraisablehook` keeps quiet about the dropped
    # interrupts only: other errors in finalizers are still printed.
    class RaisesWhenCollected:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", cli.ignore_dropped_interrupts)
    obj = RaisesWhenCollected(KeyboardInterrupt())
    del obj
    assert capsys.readouterr().err == ""
    obj = RaisesWhenCollected(ValueError("a real bug"))
    del obj
    assert "ValueError: a real bug" in capsys.readouterr().err


# --- nothing a user has is lost ---------------------------------------------


def snapshot(folder):
    """`{relative path: bytes}` of every file below `folder`."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_output_that_holds_user_files_is_refused_up_front(tmp_path):
    # Each --output here would once have been emptied or replaced by the
    # swap; now each is refused before training, and nothing changes.
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "todo.txt").write_text("mine")
    (work / "corpus").mkdir()
    (work / "corpus" / "book.txt").write_text(LM_TINY_CORPUS)
    (work / "plain").write_text("a file")
    cases = [
        (["--output", "notes"], "holds files that are not part of a model "
         "bundle (todo.txt)"),
        (["--output", "plain"], "is a file, not a bundle folder"),
        (["--output", "."], "it is the current folder or one above it"),
        (["--output", "corpus", "--corpus", "corpus/book.txt"],
         "holds files that are not part of a model bundle (book.txt)"),
        (["--output", "out", "--corpus", "out/x.txt"],
         "--corpus must not be inside --output (out)"),
    ]  # fmt: skip
    before = snapshot(work)
    for flags, words in cases:
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "model.py"), *flags],
            cwd=work, env=script_env(), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        check_one_line_error(
            result.returncode, result.stdout, result.stderr, words
        )
        assert snapshot(work) == before, flags
    assert sorted(p.name for p in work.iterdir()) == [
        "corpus", "notes", "plain",
    ]  # fmt: skip


def test_a_diverging_run_fails_and_keeps_the_old_bundle(
    tmp_path, lm_trained, lm_corpus_file, capsys
):
    target = tmp_path / "saved_model"
    shutil.copytree(lm_trained[0], target)
    before = snapshot(target)
    flags = ["--corpus", lm_corpus_file, "--output", target, *LM_TINY_FLAGS]
    code = load_script("model.py").main(
        [*map(str, flags), "--learning-rate", "1e30"]
    )
    err = capsys.readouterr().err
    check_one_line_error(code, "", err, "training diverged: the loss")
    assert "nothing was saved (lower --learning-rate" in err
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".saved_model.lock", "saved_model",
    ]  # fmt: skip


def test_a_second_training_on_the_same_output_is_refused(
    tmp_path, lm_trained, lm_corpus_file
):
    target = tmp_path / "saved_model"
    shutil.copytree(lm_trained[0], target)
    before = snapshot(target)
    with OutputLock(target):  # a first training, still running
        # Refused at once, as documented: before TensorFlow loads.
        result = run_script(
            "-c", BLOCK_TENSORFLOW,
            "model.py", "--corpus", lm_corpus_file, "--output", target,
            *LM_TINY_FLAGS,
        )  # fmt: skip
    check_one_line_error(
        result.returncode, result.stdout, result.stderr,
        f"is being written by another run (process {os.getpid()}); wait "
        "for it to finish or choose another output folder",
    )  # fmt: skip
    assert snapshot(target) == before


def test_ctrl_c_while_tensorflow_loads_exits_130(tmp_path):
    # The cheap checks take a fraction of a second, TensorFlow's import
    # seconds: an interrupt a second in lands in the import.
    proc = subprocess.Popen(
        [sys.executable, "model.py", "--output", tmp_path / "out"],
        cwd=REPO_ROOT, env=script_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # On a busy machine the second may end before the imports do.
    assert err.strip().splitlines() in (
        [f"model.py: interrupted; {tmp_path / 'out'} left unchanged"],
        ["model.py: interrupted"],
    )
    assert not (tmp_path / "out").exists()


# Says when Python has started (the interpreter's own start-up, its `site`
# imports, is not model.py's to guard), then runs the script.
STARTED_THEN_RUN = """
import sys
sys.argv = sys.argv[1:]
with open(sys.argv[0]) as f:
    code = compile(f.read(), sys.argv[0], "exec")
print("started", file=sys.stderr, flush=True)
exec(code, {"__name__": "__main__", "__file__": sys.argv[0]})
"""


@pytest.mark.parametrize("delay", [0.02, 0.05, 0.1, 0.2, 0.4])
def test_ctrl_c_as_model_py_starts_gives_no_traceback(tmp_path, delay):
    # Before the run's own handler: while the libraries load.
    proc = subprocess.Popen(
        [sys.executable, "-c", STARTED_THEN_RUN, "model.py",
         "--output", tmp_path / "out"],
        cwd=REPO_ROOT, env=script_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr.readline() == "started\n"
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("model.py: interrupted")
    assert not (tmp_path / "out").exists()


def test_a_bad_byte_on_stdin_skips_that_line_only(lm_trained, lm_predictor):
    result = subprocess.run(
        [sys.executable, "serve.py", "--model-dir", str(lm_trained[0])],
        input=b"the cat\n\xff\xfe how\nhow are\n",
        cwd=REPO_ROOT, env=script_env(), capture_output=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        lm_predictor.predict_next("the cat"),
        "",  # the bad line keeps its place
        lm_predictor.predict_next("how are"),
    ]
    assert result.stderr.decode().splitlines() == [
        "serve.py: line 2 is not utf-8 text (byte 0); skipped"
    ]


def test_the_quick_start_leaves_git_status_clean():
    # `python model.py` in the repository writes saved_model/ and the lock
    # and temporary folders beside it: all ignored; only the folder's
    # README is tracked (and every save carries it over).
    git = ["git", "-C", str(REPO_ROOT)]
    inside = subprocess.run(
        [*git, "rev-parse", "--is-inside-work-tree"], capture_output=True
    )
    if inside.returncode != 0:
        pytest.skip("not a git checkout")
    written = [
        "saved_model/model.keras", "saved_model/training.png",
        ".saved_model.lock", ".saved_model.tmp-1a2b/model.keras",
        ".saved_model.old-123/model.keras",
    ]  # fmt: skip
    ignored = subprocess.run(
        [*git, "check-ignore", "--no-index", *written],
        capture_output=True, text=True,
    )  # fmt: skip
    assert ignored.stdout.split() == written
    tracked = subprocess.run(
        [*git, "ls-files", "saved_model"], capture_output=True, text=True
    )
    assert tracked.stdout.split() == ["saved_model/README.md"]
    assert check_output(REPO_ROOT / "saved_model")  # a valid target
