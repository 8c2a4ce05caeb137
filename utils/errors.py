"""The course's own error: one paragraph that names the cause and the fix."""


class CourseError(RuntimeError):
    """A mistake the learner can fix; the message says what happened and what to do."""
