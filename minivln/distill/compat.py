"""Can a teacher distil into a student?  One check, before any data work, for both stages.

The teacher runs on the student's inputs: in stage 1 on the very same pretraining batch, in stage 2
on the same panoramas, map and instruction tokens.  So the two networks must agree on what they read:
view feature size, the object tokens (when the student has them), the vocabulary and, in stage 1
where the teacher gets the student's panorama tensors as they are, the angle feature size.
"""

from __future__ import annotations

from minivln.config import ConfigError
from minivln.model.config import DUETConfig


def check_teacher(student: DUETConfig, teacher: DUETConfig, *, stage: int, source: str = "the teacher") -> None:
    """Raise one :class:`~minivln.config.ConfigError` naming every input the teacher cannot share with
    the student (``stage`` 1 or 2; ``source`` names the teacher in the message, e.g. its path)."""
    problems = []
    if teacher.image_feat_size != student.image_feat_size:
        problems.append(f"view features {teacher.image_feat_size}-d (student {student.image_feat_size}-d)")
    if student.use_objects and (not teacher.use_objects or teacher.obj_feat_size != student.obj_feat_size):
        have = f"{teacher.obj_feat_size}-d" if teacher.use_objects else "no"
        problems.append(f"{have} object tokens (student {student.obj_feat_size}-d)")
    if teacher.vocab_size != student.vocab_size:
        problems.append(f"a {teacher.vocab_size}-token vocabulary (student {student.vocab_size})")
    if stage == 1 and teacher.angle_feat_size != student.angle_feat_size:
        problems.append(f"{teacher.angle_feat_size}-d angle features (student {student.angle_feat_size}-d)")
    if problems:
        raise ConfigError(f"{source} cannot teach this student in stage {stage}: it takes "
                          + "; ".join(problems) + " - both must read the same inputs")


__all__ = ["check_teacher"]
