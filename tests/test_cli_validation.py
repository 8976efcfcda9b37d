"""Every CLI argument is checked before anything runs; --dry-run checks and writes nothing.

The property test feeds random argument lists (valid values, invalid values, random text, unknown
options, missing required ones) to `mbpo train/run/compile/submit/presets` and checks that the
only failures are the documented ones: exit code 2 with argparse's "error: argument ..." or
"mbpo: configuration error: ...", 3 for a store or state file, 1 for an unreachable tracking
server or Docker engine; never a traceback, and nothing written by a failing or dry run.
"""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mbpo_core.config import MBPOConfig, available_presets, make_config
from mbpo_core.runstore import RunStore
from mbpo_core.storage import open_store
from pipelines.cli import main
from tests.conftest import TINY

ENV = "InvertedPendulum-v5"


def _call(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's SystemExit is an exit code too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    return rc, out.getvalue(), err.getvalue()


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _fixtures(root: Path) -> None:
    """A plain file, folders and a stored run named 'existing' in STORE=root/store."""
    (root / "file").write_text("not a folder, not a state")
    (root / "dir").mkdir()
    (root / "dir.yaml").mkdir()
    RunStore(open_store(root / "store").uri("runs/existing")).write_info(
        make_config(ENV, TINY), 1000, list(TINY))


@pytest.fixture(scope="module")
def state_file(tmp_path_factory) -> Path:
    """A real `mbpo train --save-state` state.pt (InvertedPendulum-v5, TINY, seed 0)."""
    from mbpo_core.state import save_state
    from mbpo_core.trainer import MBPOTrainer

    path = tmp_path_factory.mktemp("state") / "state.pt"
    save_state(MBPOTrainer(make_config(ENV, TINY, seed=0)).state_dict(), path)
    return path


@pytest.fixture
def offline(monkeypatch):
    """S3 at a refused loopback port (fails at once, no retries), no Docker engine, no KFP."""
    for k, v in {"MBPO_S3_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k",
                 "AWS_SECRET_ACCESS_KEY": "s", "AWS_MAX_ATTEMPTS": "1",
                 "DOCKER_HOST": "unix:///nonexistent/docker.sock"}.items():
        monkeypatch.setenv(k, v)
    for k in ("MBPO_STORE", "KFP_HOST", "MLFLOW_RUN_ID", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(k, raising=False)


# -- each validation: exit code 2, the argument and the value named, nothing written -----------
TRAIN = ["train", "--env", ENV, "--total-steps", "100", "--out", "OUT"]
RUN = ["run", "--env", ENV, "--total-steps", "100", "--out", "OUT", "--store", "store"]
SUBMIT = ["submit", "--env", ENV, "--total-steps", "100", "--store", "s3://bkt/mbpo"]
COMPILE = ["compile", "--env", ENV, "--rounds", "2"]

BAD = [  # (argv, what stderr must contain: the argument, the value, what is allowed)
    (TRAIN + ["--seed", "-1"], ["--seed", "-1 is out of range; allowed 0 to 2147483647"]),
    (TRAIN + ["--seed", "4294967296"], ["--seed", "4294967296 is out of range"]),
    (TRAIN + ["--seed", "x"], ["--seed", "'x' is not an integer; allowed 0 to"]),
    (TRAIN[:-1] + ["file"], ["--out", "'file' exists and is not a folder"]),
    (TRAIN[:-1] + ["file/sub"], ["--out", "'file/sub'", "is not a folder"]),
    (TRAIN[:-1] + [""], ["--out", "'': allowed a folder path"]),
    (TRAIN[:-3] + ["0", "--out", "OUT"], ["--total-steps", "0 is out of range; allowed 1 to"]),
    (TRAIN[:-3] + ["10000000000", "--out", "OUT"], ["--total-steps", "10000000000 is out of range"]),
    (TRAIN + ["--threads", "0"], ["--threads", "0 is out of range; allowed 1 to 1024"]),
    (TRAIN + ["--threads", "5000"], ["--threads", "5000 is out of range"]),
    (TRAIN + ["--device", "cuda:x"], ["--device", "'cuda:x': allowed cpu, cuda or cuda:N"]),
    (TRAIN + ["--resume-from", "missing.pt"], ["--resume-from", "'missing.pt': no such file"]),
    (TRAIN + ["--resume-from", "dir"], ["--resume-from", "'dir': no such file"]),
    (TRAIN + ["--tracking-uri", "ftp://h/x"], ["--tracking-uri", "'ftp://h/x': scheme 'ftp' is not"]),
    (TRAIN + ["--tracking-uri", "http://h:port"], ["--tracking-uri", "'http://h:port' is not a valid"]),
    (TRAIN + ["--tracking-uri", "sqlite:///nodir/m.db"],
     ["mbpo: configuration error:", "sqlite:///nodir/m.db", "folder 'nodir' does not exist"]),
    (TRAIN + ["--experiment", ""], ["--experiment", "'': allowed a name of 1-500"]),
    (TRAIN + ["--registered-model", "a/b"], ["--registered-model", "'a/b': allowed"]),
    (RUN + ["--run-name", "a/b"], ["--run-name", "'a/b': allowed 1-128 letters"]),
    (RUN + ["--run-name", ".."], ["--run-name", "'..': allowed"]),
    (RUN + ["--run-name", "a b"], ["--run-name", "'a b': allowed"]),
    (RUN + ["--run-name", "ok\n"], ["--run-name", "'ok\\n': allowed"]),
    (RUN + ["--run-name", ""], ["--run-name", "'': allowed"]),
    (RUN + ["--run-name", "x" * 129], ["--run-name", "'xxxx", "allowed 1-128"]),
    (RUN + ["--run-name", "existing"], ["a run named 'existing' already exists"]),
    (RUN + ["--store", "ftp://h/x"], ["--store", "'ftp://h/x': scheme 'ftp' is not supported"]),
    (RUN + ["--store", "s3://"], ["--store", "'s3://': an s3:// URL needs a bucket"]),
    (RUN + ["--store", "file"], ["--store", "'file' exists and is not a folder"]),
    (RUN + ["--rounds-per-run", "26"], ["--rounds-per-run", "26 rounds", "allowed 1-25"]),
    (RUN + ["--seeds", "1", "1"], ["mbpo: configuration error: --seeds 1 1: each seed once"]),
    (RUN + ["--seeds", "-2"], ["--seeds", "-2 is out of range; allowed 0 to"]),
    (RUN + ["--parallel", "2"], ["mbpo: configuration error: --parallel 2: applies only with --seeds"]),
    (RUN + ["--image", ""], ["--image", "'': allowed an image reference"]),
    (RUN + ["--image", "my image"], ["--image", "'my image': allowed an image reference"]),
    (RUN + ["--resume-from", "ftp://h/r"], ["--resume-from", "'ftp://h/r': allowed a run URL"]),
    (COMPILE + ["-o", "dir"], ["--output", "'dir': allowed a .yaml or .yml file"]),
    (COMPILE + ["-o", "dir.yaml"], ["--output", "'dir.yaml' is a folder"]),
    (COMPILE + ["-o", "p.json"], ["--output", "'p.json': allowed a .yaml or .yml file"]),
    (COMPILE + ["-o", "file/x.yaml"], ["--output", "'file/x.yaml'", "is not a folder"]),
    (COMPILE + ["-o", "p.yaml", "--image", "Bad/Image"], ["--image", "'Bad/Image': allowed"]),
    (SUBMIT + ["--host", "kfp.example.com"], ["--host", "'kfp.example.com': allowed an http://"]),
    (SUBMIT + ["--namespace", "Team_RL"], ["--namespace", "'Team_RL': allowed a Kubernetes"]),
    (SUBMIT + ["--kfp-experiment", " "], ["--kfp-experiment", "' ': allowed a name"]),
    (SUBMIT[:-1] + ["local"], ["mbpo: configuration error: --store for a cluster run must be an s3://"]),
    (SUBMIT[:1] + SUBMIT[-2:] + ["--seeds", "1", "2"], ["--seeds needs --env and --total-steps"]),
    (SUBMIT + ["--seeds", "1", "2", "--follow"], ["--seeds takes no --follow"]),
]


BAD_CASES = [(argv + ["--dry-run"] * dry, fragments) for dry in (False, True) for argv, fragments in BAD
             if not (dry and argv[0] == "compile")]  # compile has no --dry-run


@pytest.mark.parametrize("argv, fragments", BAD_CASES,
                         ids=[" ".join(a[:1] + a[-3:])[:70] for a, _ in BAD_CASES])
def test_bad_argument_fails_early_naming_argument_and_value(argv, fragments, tmp_path, monkeypatch,
                                                             offline):
    monkeypatch.chdir(tmp_path)
    _fixtures(tmp_path)
    before = _tree(tmp_path)
    rc, _, err = _call(argv)
    assert rc == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert re.search(r"error: argument |mbpo: configuration error: ", err)
    assert _tree(tmp_path) == before  # no OUT, no store, no YAML, no MLflow database
    assert not (tmp_path / "OUT").exists()


def test_credentials_in_urls_are_refused_and_not_echoed(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    for argv in (TRAIN + ["--tracking-uri", "http://user:s3cret@mlflow.example"],
                 RUN + ["--store", "s3://AKIA:s3cret@bucket/p"],
                 SUBMIT + ["--host", "https://admin:s3cret@kfp.example.com"]):
        rc, _, err = _call(argv)
        assert rc == 2 and "has credentials in it" in err and "***@" in err
        assert "s3cret" not in err
    assert not any(tmp_path.iterdir())


def test_help_documents_dry_run(capsys):
    for command in ("train", "run", "submit"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
        assert "--dry-run" in capsys.readouterr().out


# -- --dry-run: the resolved configuration, nothing written ------------------------------------
def test_train_dry_run_prints_the_config_and_writes_nothing(tmp_path, state_file):
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    overrides = ["sac.hidden_size=64", "rollout.schedule=[1, 2, 1, 3]"]
    rc, stdout, err = _call(["train", "--env", "Hopper-v5", "--total-steps", "5000", "--seed", "3",
                             "--out", str(out), "--tracking-uri", f"sqlite:///{db}", "--dry-run",
                             "--set", *overrides])
    assert rc == 0, err
    plan = json.loads(stdout)
    assert MBPOConfig.from_dict(plan["config"]) == make_config("Hopper-v5", overrides, seed=3)
    assert plan["total_steps"] == 5000 and plan["out"] == str(out)
    assert plan["tracking_uri"] == f"sqlite:///{db}" and plan["registered_model"] == "mbpo-Hopper-v5"
    assert not out.exists() and not db.exists()  # no output folder, no MLflow run

    # a resume: the stored configuration, and the same check on --env as a real resume
    rc, stdout, _ = _call(["train", "--env", ENV, "--total-steps", "300", "--out", str(out),
                           "--resume-from", str(state_file), "--no-tracking", "--dry-run"])
    assert rc == 0
    assert MBPOConfig.from_dict(json.loads(stdout)["config"]) == make_config(ENV, TINY, seed=0)
    rc, _, err = _call(["train", "--env", "Hopper-v5", "--total-steps", "300", "--out", str(out),
                        "--resume-from", str(state_file), "--no-tracking", "--dry-run"])
    assert rc == 2 and "differs from the resumed run's InvertedPendulum-v5" in err
    # a file that is no state: exit code 3, for a real run as for a dry one
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for extra in ([], ["--dry-run"]):
        rc, _, err = _call(["train", "--env", ENV, "--total-steps", "300", "--out", str(out),
                            "--resume-from", str(tmp_path / "junk.pt"), "--no-tracking", *extra])
        assert rc == 3 and "mbpo: state error: state file" in err
    assert not out.exists()


def test_run_dry_run_prints_run_urls_and_config_and_writes_nothing(tmp_path):
    store, out, db = tmp_path / "store", tmp_path / "out", tmp_path / "mlflow.db"
    rc, stdout, err = _call(["run", "--env", ENV, "--total-steps", "2000", "--seed", "4",
                             "--out", str(out), "--store", str(store), "--run-name", "r1",
                             "--rounds-per-run", "3", "--tracking-uri", f"sqlite:///{db}",
                             "--dry-run", "--set", *TINY])
    assert rc == 0, err
    plan = json.loads(stdout)
    assert plan["rounds_per_run"] == 3 and plan["runner"] == "subprocess"
    [run] = plan["runs"]
    assert run["run_url"] == open_store(store).uri("runs/r1") and run["seed"] == 4
    assert MBPOConfig.from_dict(run["config"]) == make_config(ENV, TINY, seed=4)
    assert not store.exists() and not out.exists() and not db.exists()

    # several seeds: one run each, and no MLflow parent run
    rc, stdout, err = _call(["run", "--env", ENV, "--total-steps", "2000", "--seeds", "1", "2",
                             "--parallel", "2", "--out", str(out), "--store", str(store),
                             "--run-name", "grp", "--tracking-uri", f"sqlite:///{db}", "--dry-run"])
    assert rc == 0, err
    plan = json.loads(stdout)
    assert [r["run_url"].rsplit("/", 1)[1] for r in plan["runs"]] == ["grp-s1", "grp-s2"]
    assert [r["config"]["seed"] for r in plan["runs"]] == [1, 2]
    assert not store.exists() and not out.exists() and not db.exists()

    # a stored run: the resume source is read and its configuration printed
    RunStore(open_store(store).uri("runs/old")).write_info(make_config(ENV, TINY, seed=7), 900, TINY)
    before = _tree(tmp_path)
    rc, stdout, err = _call(["run", "--resume-from", open_store(store).uri("runs/old"), "--out",
                             str(out), "--no-tracking", "--dry-run"])
    assert rc == 0, err
    [run] = json.loads(stdout)["runs"]
    assert run["resumed"] and run["total_steps"] == 900 and run["config"]["seed"] == 7
    assert _tree(tmp_path) == before


def test_submit_dry_run_does_not_contact_kfp(tmp_path, monkeypatch, offline, s3_env):
    import pipelines.submit

    def no_kfp(*_):
        raise AssertionError("--dry-run contacted the KFP API")

    monkeypatch.setattr(pipelines.submit, "_client", no_kfp)
    bucket = s3_env  # a real S3 server: the submission first checks that the run name is free
    db = tmp_path / "mlflow.db"
    rc, stdout, err = _call(["submit", "--env", "Hopper-v5", "--total-steps", "20000",
                             "--store", f"s3://{bucket}/mbpo", "--run-name", "hop", "--seeds", "0", "1",
                             "--host", "https://kfp.example.com", "--namespace", "team-rl",
                             "--chain-in-cluster", "--tracking-uri", f"sqlite:///{db}",
                             "--dry-run"])
    assert rc == 0, err
    plan = json.loads(stdout)
    assert [r["run_url"] for r in plan["runs"]] == [f"s3://{bucket}/mbpo/runs/hop-s0",
                                                    f"s3://{bucket}/mbpo/runs/hop-s1"]
    assert plan["host"] == "https://kfp.example.com" and plan["chain"] == "in-cluster"
    assert MBPOConfig.from_dict(plan["runs"][1]["config"]) == make_config("Hopper-v5", seed=1)
    assert not db.exists() and not any(p != db for p in tmp_path.iterdir())
    from mbpo_core.storage import open_store

    assert open_store(f"s3://{bucket}").list() == [], "a dry run writes nothing to the store"


# -- random arguments: only the documented errors -----------------------------------------------
class Opt:
    """An option's valid and invalid values; each value is the list of tokens after it."""

    def __init__(self, valid, invalid=(), required=False):
        self.valid = [v if isinstance(v, list) else [v] for v in valid]
        self.invalid = [v if isinstance(v, list) else [v] for v in invalid]
        self.required = required


FLAG = Opt([[]], [["extra"]])
T = "{tmp}"
ENVS = Opt(available_presets(), ["Nope-v0", "", "hopper-v5"], required=True)
SETS = Opt([["sac.hidden_size=64"], ["init_steps=100", "seed=3"], TINY[:3]],
           [["sac.real_ratio=1.5"], ["bogus=1"], ["noequals"], ["ensemble.num_elites=99"], [""]])
STEPS = Opt(["100", "1", "5000"], ["0", "-5", "abc", "1e3", "1000000001", "9" * 30])
SEED = Opt(["0", "7", "2147483647"], ["-1", "2147483648", "4294967296", "x", "1.5"])
TRACKING = {
    "--tracking-uri": Opt([f"sqlite:///{T}/mlflow.db", f"file://{T}/mlruns", ""],
                          ["ftp://x", "http://u:p@h", "http://[::1", "http://h:port", "http://",
                           f"sqlite:///{T}/nodir/m.db", "http://127.0.0.1:1", "a\x01b"]),
    "--experiment": Opt(["mbpo", "exp 1"], ["", " ", "a\nb", "x" * 501]),
    "--registered-model": Opt(["", "m", "mbpo-x"], ["a/b", "a:b", "..", ".", " ", "a/../b"]),
    "--no-tracking": FLAG,
}
LOCAL_TRACKING = {**TRACKING, "--stack": Opt([], [[], [f"{T}/nostack"]])}
OUT = Opt([f"{T}/out", "rel-out", f"{T}/dir"],
          ["", f"{T}/file", f"{T}/file/sub", f"{T}/" + "x" * 300, f"{T}/a\x00b"], required=True)
STORE = Opt([f"{T}/store", f"file://{T}/store2", "s3://bkt/p"],
            ["ftp://x", "s3://", "s3://k:s@b", f"{T}/file", "", f"{T}/file/sub", "a:b"])
RUN_NAME = Opt(["r1", "my.run_2", "existing"], ["", "a b", "a/b", "..", "x\n", "x" * 129, "-x"])
IMAGE = Opt(["registry.example/mbpo:1.2.3", "localhost:5000/mbpo@sha256:abc"],
            ["", "a b", "UPPER/x", "x:", "x@"])
SEEDS = Opt([["0"], ["1", "2"]], [["1", "1"], ["-1"], ["x"], ["2147483648"]])

COMMANDS = {
    "train": {"--env": ENVS, "--total-steps": Opt(STEPS.valid, STEPS.invalid, required=True),
              "--seed": SEED, "--out": OUT, "--set": SETS,
              "--device": Opt(["cpu"], ["cuda", "cuda:0", "tpu", "cuda:x", ""]),
              "--threads": Opt(["1", "4"], ["0", "1025", "-3", "two"]),
              "--save-state": FLAG, "--checkpoint-every": Opt(["5"], ["0", "x"]),
              "--resume-from": Opt(["{state}"], [f"{T}/missing.pt", f"{T}/dir", f"{T}/file"]),
              "--no-progress": FLAG, **LOCAL_TRACKING},
    "run": {"--env": Opt(ENVS.valid, ENVS.invalid), "--total-steps": STEPS, "--seed": SEED,
            "--set": SETS, "--device": Opt(["cpu"], ["cuda", "gpu"]), "--out": OUT,
            "--store": STORE, "--run-name": RUN_NAME,
            "--rounds-per-run": Opt(["1", "10", "25"], ["0", "26", "x"]),
            "--resume-from": Opt([f"{T}/store/runs/existing"],
                                 [f"{T}/nothing", "ftp://x", "", f"{T}/file", "s3://bkt/p/runs/x"]),
            **LOCAL_TRACKING, "--threads": Opt(["2"], ["0", "1025"]),
            "--runner": Opt(["subprocess"], ["docker", "podman"]), "--image": IMAGE,
            "--seeds": SEEDS, "--parallel": Opt(["1", "2"], ["0", "x"]),
            "--keep-artifacts": FLAG, "--verbose": FLAG, "--no-progress": FLAG,
            "--no-warm-workers": FLAG},
    "compile": {"--env": ENVS, "--rounds": Opt(["1", "2"], ["0", "26", "x", "-1"], required=True),
                "--set": SETS, "--continuation": FLAG, "--image": IMAGE, "--gpu": FLAG,
                "-o": Opt([f"{T}/pipe.yaml", f"{T}/sub/p.yaml", "rel.yaml"],
                          [f"{T}/dir", "", f"{T}/file/x.yaml", f"{T}/" + "y" * 300 + ".yaml",
                           "p.json", "p", f"{T}/dir.yaml"],
                          required=True)},
    "presets": {"--env": ENVS, "--set": SETS},
    "submit": {"--env": Opt(ENVS.valid, ENVS.invalid), "--total-steps": STEPS, "--seed": SEED,
               "--set": SETS, "--device": Opt(["cpu", "cuda"], ["tpu"]),
               "--store": Opt(["s3://bkt/p"], [f"{T}/store", "ftp://x", "s3://", "s3://k:s@b"],
                              required=True),
               "--run-name": RUN_NAME, "--rounds-per-run": Opt(["10"], ["26"]),
               "--resume-from": Opt(["s3://bkt/p/runs/x"], [f"{T}/store/runs/existing", "ftp://x"]),
               **TRACKING,
               "--host": Opt(["https://kfp.example.com", "http://localhost:8888"],
                             ["ftp://x", "", "kfp.example.com", "http://u:p@h", "http://"]),
               "--namespace": Opt(["team-rl"], ["Team_RL", "", "a" * 64, "x_y"]),
               "--kfp-experiment": Opt(["mbpo"], ["", " "]), "--image": IMAGE, "--gpu": FLAG,
               "--seeds": SEEDS, "--follow": FLAG, "--chain-in-cluster": FLAG},
}
DRY_RUN = {"train", "run", "submit"}
_junk = st.text(max_size=12).filter(lambda s: not s.startswith(("/", "~")) and ".." not in s)
_extra = st.one_of(st.sampled_from(["--bogus", "-z", "--seedz", "--", "extra", "-h", "=x"]), _junk)


def _coherent(command: str, chosen: dict[str, list[str]]) -> None:
    if command == "train" and "--resume-from" in chosen:
        chosen["--env"] = [ENV]  # the stored state's task
    if command not in ("run", "submit"):
        return
    if "--resume-from" in chosen:
        for name in ("--seeds", "--set", "--env", "--parallel"):
            chosen.pop(name, None)
    else:
        chosen.setdefault("--env", [ENV])
        chosen.setdefault("--total-steps", ["1000"])
    if "--seeds" not in chosen:
        chosen.pop("--parallel", None)
    if "--seeds" in chosen or "--chain-in-cluster" in chosen:
        chosen.pop("--follow", None)


@st.composite
def cli_args(draw) -> tuple[str, list[str], bool]:
    """(command, argv, whether argv holds one known-invalid argument)."""
    command = draw(st.sampled_from(sorted(COMMANDS)))
    known_bad = False
    table = COMMANDS[command]
    mode = draw(st.sampled_from(["valid", "valid", "one-bad", "one-bad", "random"]))
    bad = draw(st.sampled_from(sorted(table))) if mode == "one-bad" else None
    chosen: dict[str, list[str]] = {}
    for name in draw(st.permutations(sorted(table))):
        opt = table[name]
        valid = st.sampled_from(opt.valid) if opt.valid else st.none()
        if name == bad:
            choices = [st.sampled_from(opt.invalid or opt.valid), _junk.map(lambda s: [s])]
            if opt.required:
                choices.append(st.none())  # a required argument missing
            value = draw(st.one_of(*choices))
            # a value from the table's invalid list (or a required one left out) must be refused
            known_bad = (value is None and opt.required) or (value in opt.invalid)
            if value is not None:
                chosen[name] = value
            continue
        elif mode == "random":
            choices = [st.none(), valid, _junk.map(lambda s: [s])]
            if opt.invalid:
                choices.append(st.sampled_from(opt.invalid))
        else:
            choices = [valid] if opt.required else [st.none(), valid]
        value = draw(st.one_of(*choices))
        if value is not None:
            chosen[name] = value
    if mode == "valid":  # valid values that also fit together: mostly runs that would start
        _coherent(command, chosen)
    argv = [command, "--dry-run"] if command in DRY_RUN else [command]
    for name, value in chosen.items():
        argv += [name, *value]
    if mode == "random":
        for token in draw(st.lists(_extra, max_size=2)):
            argv.insert(draw(st.integers(0, len(argv))), token)
        if draw(st.booleans()):
            argv = ["--log-level", draw(st.sampled_from(["DEBUG", "WARNING", "LOUD"])), *argv]
    return command, argv, known_bad


ARGPARSE_ERROR = re.compile(r"error: (argument \S+|the following arguments are required: \S+|"
                            r"unrecognized arguments: |ambiguous option: \S+)")


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cli_args())
def test_random_cli_arguments_fail_only_with_documented_errors(case, state_file, offline):
    command, argv, known_bad = case
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        root = Path(tmp)
        _fixtures(root)
        argv = [a.replace(T, tmp).replace("{state}", str(state_file)) for a in argv]
        before = _tree(root)
        rc, out, err = _call(argv)  # any exception but SystemExit fails the test
        event(f"{command}: exit code {rc}")  # pytest --hypothesis-show-statistics
        assert "Traceback" not in err
        created = _tree(root) - before
        assert not (known_bad and rc == 0), f"{argv} holds a known-invalid argument: {out[-500:]}"
        if rc == 0:
            if out.startswith("usage:"):  # -h / --help
                assert not created
            elif command == "compile":
                output = Path(argv[argv.index("-o") + 1]).resolve()
                assert output.is_file() and out.startswith("wrote ")
                for rel in created:  # only the YAML and the folders above it
                    path = (root / rel).resolve()
                    assert path == output or path in output.parents, rel
                for rel in sorted(created, key=len):
                    shutil.rmtree(root / rel, ignore_errors=True)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(root / rel)
            else:  # presets, or a dry run: the resolved configuration, nothing written
                plan = json.loads(out)
                if command == "presets":
                    MBPOConfig.from_dict(plan)
                elif command == "train":
                    MBPOConfig.from_dict(plan["config"])
                else:
                    assert plan["runs"] and all(MBPOConfig.from_dict(r["config"]) for r in plan["runs"])
                assert plan.get("dry_run", command == "presets")
                assert not created, created
            return
        assert not created, created
        if rc == 2:
            assert ARGPARSE_ERROR.search(err) or "mbpo: configuration error: " in err, err
        elif rc == 3:
            assert re.search(r"mbpo: (storage|state) error: ", err), err
        else:  # an unreachable tracking server (local commands) or Docker engine
            assert rc == 1, (rc, err)
            assert re.search(r"mbpo: .*(does not answer|--runner docker)", err), err


def test_resume_from_a_file_that_is_not_a_state_says_so(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint\n")
    rc = main(["train", "--env", "InvertedPendulum-v5", "--total-steps", "500", "--out",
               str(tmp_path / "o"), "--resume-from", str(notes)])
    assert rc == 3
    err = capsys.readouterr().err
    assert "is not a state file of this project" in err and "mbpo train --save-state" in err


def test_sync_of_a_missing_folder_names_it(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert main(["sync", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and str(missing) in err
    assert "nothing pending" not in err
