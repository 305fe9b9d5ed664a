"""The --model flag of the commands that use a trained or imported model (generate, chat, evaluate)."""

from absl import flags

MODEL = flags.DEFINE_string('model', None, "A run's workdir, a checkpoint folder or a Hugging Face model folder.")
flags.mark_flags_as_required(['model'])
