"""Can a teacher distil into a student?  One check, before any data work, for both stages.

The teacher runs on the student's inputs: in stage 1 on the very same pretraining batch, in stage 2
on the same panoramas, map and instruction tokens.  So the two networks must agree on what they read:
view feature size, the object tokens (both or neither: a REVERIE teacher, which reads objects, is no
teacher for an R2R student, which has none, nor the other way round), the vocabulary and, in stage 1
where the teacher gets the student's panorama tensors as they are, the angle and box feature sizes.
In stage 1 the attention and hidden-state terms also pair each student layer with a teacher layer
(:func:`~minivln.distill.stage1.encoder_layer_maps`: every encoder's teacher depth a positive
multiple of the student's) and the attention term compares head by head (as many heads in both).
"""

from __future__ import annotations

from collections.abc import Mapping

from minivln.config import ConfigError
from minivln.distill.losses import layer_map
from minivln.distill.stage1 import ENCODERS, encoder_depths
from minivln.model.config import DUETConfig


def _objects(cfg: DUETConfig) -> str:
    return f"{cfg.obj_feat_size}-d object tokens" if cfg.use_objects else "no object tokens"


def check_teacher(student: DUETConfig, teacher: DUETConfig, *, stage: int, source: str = "the teacher",
                  kd_terms: Mapping[str, float] | None = None) -> None:
    """Raise one :class:`~minivln.config.ConfigError` naming everything the teacher cannot share with
    the student (``stage`` 1 or 2; ``source`` names the teacher in the message, e.g. its path).

    ``kd_terms``: stage 1's term weights keyed ``emb``, ``att``, ``hid`` (as ``kd_terms`` of the
    pretraining config; a term weighted 0 is not built); ``None`` means every term (the default
    config).  The layer map is checked only when ``att`` or ``hid`` is on, the heads only with
    ``att``."""
    inputs, layers = [], []  # what it reads that the student does not give; what the layer map needs
    if teacher.image_feat_size != student.image_feat_size:
        inputs.append(f"view features {teacher.image_feat_size}-d (student {student.image_feat_size}-d)")
    if teacher.use_objects != student.use_objects:
        task = ("an object-grounding (REVERIE) teacher for a student without objects (R2R)" if teacher.use_objects
                else "a teacher without objects (R2R) for an object-grounding (REVERIE) student")
        inputs.append(f"{_objects(teacher)} (student: {_objects(student)}; {task})")
    elif student.use_objects and teacher.obj_feat_size != student.obj_feat_size:
        inputs.append(f"{_objects(teacher)} (student {student.obj_feat_size}-d)")
    if teacher.vocab_size != student.vocab_size:
        inputs.append(f"a {teacher.vocab_size}-token vocabulary (student {student.vocab_size})")
    if stage == 1:
        if teacher.angle_feat_size != student.angle_feat_size:
            inputs.append(f"{teacher.angle_feat_size}-d angle features (student {student.angle_feat_size}-d)")
        if student.use_objects and teacher.obj_loc_size != student.obj_loc_size:
            inputs.append(f"{teacher.obj_loc_size}-d box features (student {student.obj_loc_size}-d)")
        weights = {"emb": 1.0, "att": 1.0, "hid": 1.0, **(kd_terms or {})}
        attentions, hidden = weights["att"] > 0, weights["hid"] > 0
        if attentions and teacher.num_attention_heads != student.num_attention_heads:
            layers.append(f"it has {teacher.num_attention_heads} attention heads, the student "
                          f"{student.num_attention_heads} (kd_att compares the attention scores head by head)")
        if attentions or hidden:
            s_depths, t_depths = encoder_depths(student), encoder_depths(teacher)
            for enc in ENCODERS[:3]:  # "local" has the depth of "global"
                n_s, n_t = s_depths[enc], t_depths[enc]
                if n_s == 0 and n_t == 0:  # neither has it (encoder_layer_maps: nothing to map)
                    continue
                try:
                    layer_map(n_s, n_t)
                except ValueError:
                    layers.append(
                        f"its {enc} encoder has {n_t} layers, the student's {n_s} (kd_att/kd_hid map student "
                        f"layer m to teacher layer m * N_T / N_S: N_T must be a positive multiple of N_S)")
    problems = []
    if inputs:
        problems.append("it takes " + "; ".join(inputs) + " - both must read the same inputs")
    problems += layers
    if problems:
        raise ConfigError(f"{source} cannot teach this student in stage {stage}: " + "; ".join(problems))


__all__ = ["check_teacher"]
