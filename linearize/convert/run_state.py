"""The folder of a `linearize convert` run: which --out it may write (check_out_folder), and its progress.json
(RunState: the settings and the result of each finished step, what --resume continues from)."""

from dataclasses import asdict
from pathlib import Path

from ..errors import LinearizeError
from ..layers.linear_attention import LinearAttentionConfig
from ..run_folder import CHECKPOINTS, PROGRESS, read_json, write_json
from .settings import ConvertSettings, resolve_train_attention


# What a run made before a setting existed did: its progress.json lacks the key, --resume reads this value.
SETTINGS_BEFORE_THEY_EXISTED = {"lora_loss": "ce", "lora_targets": "attention"}


def _folder_of(model: str | None) -> Path | None:
    """The folder a local --model lives in (its folder, or the folder of its .gguf file); None for a hub id or the
    bundled model."""
    if model is None or not Path(model).exists():
        return None
    return (Path(model) if Path(model).is_dir() else Path(model).parent).resolve()


def check_out_folder(out: Path, model: str | None, resume: bool, overwrite: bool):
    """Refuse an --out that would lose a model or a user's files: a file; the --model folder (or a folder above
    it); a folder that holds files but no run of `linearize convert` unless --overwrite (a run's folder: RunState
    takes it with --resume, start_over empties it with --overwrite, else RunState refuses it). Nothing is
    deleted here: --overwrite only lets a run start (and later replace the model files) in a folder that holds
    other things."""
    if out.exists() and not out.is_dir():
        raise LinearizeError(f"--out {out} is a file; give a folder (new or empty) for the converted model")
    if (src := _folder_of(model)) is not None and (src == out.resolve() or out.resolve() in src.parents):
        raise LinearizeError(f"--out {out} holds the --model {model}; converting into it would overwrite the teacher: "
                             "choose another --out")
    if not out.is_dir() or (out / PROGRESS).exists():
        return
    held = sorted(p.name for p in out.iterdir())
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise LinearizeError(f"--out {out} is not empty ({shown}) and holds no run of `linearize convert`; choose a "
                             "new or empty folder, or add --overwrite to write the converted model into it")


class RunState:
    """progress.json in the output folder (run_folder.py): settings plus the results of each finished step."""

    writer = True  # False on the ranks other than 0 of a distributed run: results stay in memory

    def __init__(self, out: Path, settings: ConvertSettings, resume: bool):
        self.path = out / PROGRESS
        if self.path.exists() and not resume:
            raise LinearizeError(f"{out} already holds a run; add --resume to continue it, --overwrite to start it "
                                 "again, or choose another --out")
        attention = settings.attention_config().to_dict()  # what the preset meant when the run started
        if resume and self.path.exists():
            self.data = read_json(self.path, fix=f"delete it to start again, or choose another --out")
            # settings added later read as what older runs did (then: the defaults of that time)
            defaults = {**asdict(ConvertSettings()), **SETTINGS_BEFORE_THEY_EXISTED}
            # the resolved attention is compared below when the run recorded it: then the overrides may differ
            overrides = ("window", "sinks", "feature_map", "feature_dim", "cache", "mix_init", "memory_cap", "heavy",
                         "local_layers", "cache_position", "cache_every")
            overrides = overrides if "attention" in self.data else ()
            recorded_settings = {k: self.data["settings"].get(k, defaults[k]) for k in defaults}
            for both in (recorded_settings, now := asdict(settings)):  # None (the default) and its value agree
                both["lora_train_attention"] = resolve_train_attention(both["lora_targets"],
                                                                       both["lora_train_attention"])
            # the cache's score is fitted after training (convert/stages.py switch_on_cache): free to change on --resume
            changed = [k for k, v in now.items()
                       if k not in overrides and k != "cache_score" and recorded_settings[k] != v]
            recorded = {**asdict(LinearAttentionConfig()), **self.data.get("attention", attention)}  # fields added
            if settings.memory_cap is None:  # the default cap, whatever it was when the run started (or before there
                recorded["memory_cap"] = attention["memory_cap"]  # was one), trains the same: no change there
            # set after training, so a default that changed since (or a run from before the setting) trains the
            # same: such a run resumes and is saved with today's
            for key in () if settings.train_with_cache else ("cache", "cache_every", "cache_position"):
                if getattr(settings, key) is None or key not in self.data.get("attention", attention):
                    recorded[key] = attention[key]
            if recorded != attention:  # later read as their defaults: what the run did
                changed.append(f"--attention {settings.attention} now means {attention}, the run has "
                               f"{self.data['attention']}")
            if changed:
                raise LinearizeError(f"--resume with different settings ({', '.join(changed)}); "
                                     "use the original ones, a new --out, or --overwrite to start again")
        else:  # written by the first record(), once the inputs have loaded: a failed start leaves no run behind
            self.data = {"settings": asdict(settings), "attention": attention, "results": {}}

    @property
    def results(self) -> dict:
        return self.data["results"]

    def record(self, **results):
        self.results.update(results)
        self.save()

    def once(self, key: str, compute):
        """results[key]: computed by compute() and recorded the first time; a resumed run reads it back."""
        if key not in self.results:
            self.record(**{key: compute()})
        return self.results[key]

    def save(self):
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.data, self.path)


def start_over(out: Path):
    """--overwrite on a run's folder: its progress and checkpoints go, so the run starts from the beginning (the
    model files are replaced when the new run saves)."""
    import shutil

    (out / PROGRESS).unlink(missing_ok=True)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
