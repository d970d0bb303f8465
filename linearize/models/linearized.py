"""The linearized model: a teacher causal LM whose attention modules are LinearAttention.

LinearizedConfig stores the teacher's config and the attention config; LinearizedForCausalLM rebuilds the
teacher skeleton from it and swaps the attention, so `save_pretrained` / `from_pretrained` (safetensors) and
`AutoModelForCausalLM.from_pretrained(dir)` work once `linearize` is imported (it registers the classes), and
with `trust_remote_code=True` in a process that never imported it (remote_code.py). `generate()` decodes with
the constant-size DecodingState (state_cache.py).
"""

from dataclasses import replace

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

from ..errors import LinearizeError
from ..layers.linear_attention import FULL_SOFTMAX, DecodingState, LinearAttention, LinearAttentionConfig
from ..loading.architectures import architecture_of
from .remote_code import AUTO_MAP, write_modeling_file
from .state_cache import state_cache

# teacher config entries the linearized config repeats at its top level, where transformers and tools (lm_eval's
# max length, generate's special tokens) look for them
TEACHER_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings", "max_position_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id")


def make_student_attention(teacher: nn.Module, config: LinearAttentionConfig) -> list[LinearAttention]:
    """One LinearAttention per teacher layer, sharing the teacher's projection modules (no copies).
    A teacher's local layers keep their exact sliding window (see loading/architectures.py), unless every layer is local
    (then all are linearized). The first config.local_layers layers keep the config's softmax window and sinks
    only (no linear part: TransNormer's DiagAttention); the saved config holds local_layers, so loading repeats it."""
    arch = architecture_of(teacher.config)
    c = teacher.config
    students = []
    for i, (attn, cfg) in enumerate(zip(arch.attention_modules(teacher), layer_configs(teacher, config))):
        student = LinearAttention(attn, cfg, c.num_attention_heads, c.num_key_value_heads,
                                  arch.rope_frequencies(teacher, i))
        students.append(student.to(attn.q_proj.weight.device))
    return students


def layer_configs(teacher: nn.Module, config: LinearAttentionConfig) -> list[LinearAttentionConfig]:
    """The attention config of each layer of `teacher` (make_student_attention's plan, built without modules, so
    settings can be checked against the model before any training)."""
    arch = architecture_of(teacher.config)
    attns = arch.attention_modules(teacher)
    if config.local_layers >= len(attns):
        raise LinearizeError(f"local_layers {config.local_layers} leaves no linearized layer in this "
                             f"{len(attns)}-layer model; use at most {len(attns) - 1}")
    windows = [arch.local_window(a) for a in attns]
    if all(w is not None for w in windows):
        windows = [None] * len(attns)
    configs = []
    for i, window in enumerate(windows):
        cfg = config
        if window is not None:  # the teacher's own local layer: its exact window alone (no sinks, heavy hitters or
            # sparse cache: a saved config's cache is the global layers')
            cfg = replace(config, window=window, linear=False, sinks=0, local_layers=0, heavy=0, cache=0, memory_cap=0)
        elif i < config.local_layers:  # DiagAttention: the window (and sinks) of the config, exact softmax
            cfg = replace(config, linear=False)
        configs.append(cfg)
    return configs


def linearized_layers(students: list) -> list[int]:
    """Indices of the layers that have a linear part (candidates for --keep-softmax); students: LinearAttention
    modules or their configs (layer_configs)."""
    return [i for i, s in enumerate(students) if getattr(s, "config", s).linear]


def exact_softmax_attention(attn: nn.Module, like: LinearAttention, config) -> LinearAttention:
    """A LinearAttention in exact causal softmax (FULL_SOFTMAX, `like`'s chunk size) over the projections of `attn`
    (a teacher attention module or a LinearAttention); its decoding state is a KV cache. config: the model's."""
    cfg = replace(FULL_SOFTMAX, chunk_size=like.config.chunk_size)
    return LinearAttention(attn, cfg, config.num_attention_heads, config.num_key_value_heads)


def swap_attention(model: nn.Module, students: list[LinearAttention], keep_softmax: tuple[int, ...] = ()) -> nn.Module:
    """Install the student attention modules in place of the teacher's. Layers in keep_softmax get exact softmax
    attention in the same module type (so decoding keeps a KV cache for them in the DecodingState)."""
    arch = architecture_of(model.config)
    for i, layer in enumerate(arch.decoder_layers(model)):
        student = students[i]
        if i in keep_softmax and student.config.linear:
            student = exact_softmax_attention(student, student, model.config)
        setattr(layer, arch.attention_attr, student)
    return model


def memory_layers(model: "LinearizedForCausalLM") -> list[LinearAttention]:
    """The attention modules with a linear memory (a linear part and a bounded window)."""
    return [m for m in model.attention_modules() if m.config.linear and m.config.window is not None]


def reconfigure(model: "LinearizedForCausalLM", **changes) -> "LinearizedForCausalLM":
    """Change training-free settings (cache, cache_every, cache_pool, cache_position, memory_cap, heavy; see
    training_free.TrainingFree, whose apply() is the way to set them) of every layer with a linear memory: its
    config (validated), its spec and the model's config, which records them."""
    for m in memory_layers(model):
        m.config = replace(m.config, **changes)
        LinearAttentionConfig(**m.config.to_dict())  # validated: e.g. the cache needs the sum rule without a gate
        m.spec = m.make_spec()
    model.config.attention = {**model.config.attention, **changes}
    return model


def without_memory(model: "LinearizedForCausalLM", keep_cache: bool = False) -> "LinearizedForCausalLM":
    """A copy of `model` whose layers read their exact part only (window + sinks, renormalised: what their softmax
    gives with the linear memory gone) and hold no memory in their state: what the memory is worth end to end is
    the model against this copy. LinearizeError if a layer has no exact part to fall back on (window 0, no sinks).
    keep_cache: the sparse cache stays (window + sinks + cache; with no memory to recall from, the cache keeps the
    keys of the largest values and drops the others: ops/sparse_cache/selection.self_recall_error)."""
    import copy

    layers = memory_layers(model)
    if not layers:
        raise LinearizeError("this model has no linear memory to switch off")
    if any(m.mix_logit is None for m in layers):
        raise LinearizeError("this model's linear layers have no softmax window or sinks to fall back on")
    off = {} if keep_cache else {"cache": 0}
    return reconfigure(copy.deepcopy(model), linear=False, memory_cap=0, **off)


class NoCodeCopy:
    """transformers' register_for_auto_class makes save_pretrained copy the defining module into the folder (this
    package's modules import their siblings, so the copy would not load); the folder gets remote_code.py's small
    modeling file and auto_map instead."""

    @classmethod
    def register_for_auto_class(cls, auto_class=None):
        pass


class LinearizedConfig(NoCodeCopy, PretrainedConfig):
    model_type = "linearized"

    def __init__(self, teacher: dict | None = None, attention: dict | None = None, keep_softmax=(), **kwargs):
        self.teacher = teacher or {}
        self.attention = attention or LinearAttentionConfig().to_dict()
        self.keep_softmax = list(keep_softmax)
        for key in TEACHER_KEYS:
            if self.teacher.get(key) is not None:
                kwargs.setdefault(key, self.teacher[key])
        kwargs.setdefault("use_cache", False)  # training and scoring keep no state; generate() asks for one
        kwargs["auto_map"] = dict(AUTO_MAP)
        super().__init__(**kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """config.json (with auto_map) and the modeling file it names."""
        super().save_pretrained(save_directory, **kwargs)
        write_modeling_file(save_directory)

    def teacher_config(self) -> PretrainedConfig:
        cfg = dict(self.teacher)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


class LinearizedForCausalLM(NoCodeCopy, PreTrainedModel, GenerationMixin):
    """forward(input_ids, ..., linear_state=DecodingState | None) -> the teacher class's CausalLMOutput; with
    use_cache=True or cache=LinearStateCache it decodes from that cache's state and returns it as `.cache`."""

    config_class = LinearizedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def __init__(self, config: LinearizedConfig):
        super().__init__(config)
        teacher_cfg = config.teacher_config()
        self.model = AutoModelForCausalLM.from_config(teacher_cfg)
        students = make_student_attention(self.model, LinearAttentionConfig(**config.attention))
        swap_attention(self.model, students, tuple(config.keep_softmax))
        self.post_init()

    @classmethod
    def from_teacher(cls, teacher: PreTrainedModel, attention: LinearAttentionConfig,
                     students: list[LinearAttention] | None = None, keep_softmax=()) -> "LinearizedForCausalLM":
        """Wrap a loaded teacher (weights shared, not copied). `students`: trained attention modules, if any."""
        teacher_dict = teacher.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "transformers_version", "architectures"):
            teacher_dict.pop(key, None)
        config = LinearizedConfig(teacher=teacher_dict, attention=attention.to_dict(), keep_softmax=keep_softmax)
        with torch.device("meta"):
            model = cls(config)
        model.model = teacher
        swap_attention(teacher, students or make_student_attention(teacher, attention), tuple(keep_softmax))
        return model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def attention_modules(self) -> list[LinearAttention]:
        return [m for m in self.model.modules() if isinstance(m, LinearAttention)]

    def new_decoding_state(self) -> DecodingState:
        return DecodingState(self.config.num_hidden_layers)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() makes no KV cache: the first forward returns a LinearStateCache

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, linear_state=None,
                cache=None, use_cache=None, **kwargs):
        legacy = kwargs.pop("past_key_values", None)  # the name transformers used before `cache`
        cache = state_cache(legacy if cache is None else cache, use_cache, self.config.num_hidden_layers)
        if cache is not None:
            linear_state = cache.state
        if linear_state is not None:
            if attention_mask is not None:
                if not bool(attention_mask.all()):
                    raise LinearizeError("padded batches cannot be decoded with a linear-attention state; generate "
                                         "one prompt at a time (batch size 1; lm_eval: --batch_size 1) or prompts "
                                         "of equal length")
                attention_mask = None  # all ones: the mask of the whole sequence, this call sees only its end
            if position_ids is None:  # continue the positions the state has seen
                x = input_ids if input_ids is not None else kwargs["inputs_embeds"]
                position_ids = torch.arange(linear_state.seen, linear_state.seen + x.shape[1], device=x.device)[None]
            linear_state.seen += position_ids.shape[-1]
            kwargs["linear_state"] = linear_state
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         labels=labels, use_cache=False, **kwargs)
        if cache is not None:
            out["cache"] = cache
        return out


AutoConfig.register("linearized", LinearizedConfig, exist_ok=True)
AutoModelForCausalLM.register(LinearizedConfig, LinearizedForCausalLM, exist_ok=True)
