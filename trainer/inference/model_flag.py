"""The --model and --dtype flags of the commands that use a trained or imported model (generate, chat, evaluate)."""

from absl import flags

MODEL = flags.DEFINE_string('model', None, "A run's workdir, a checkpoint folder or a Hugging Face model folder.")
flags.mark_flags_as_required(['model'])
DTYPE = flags.DEFINE_enum(
    'dtype',
    None,
    ['float32', 'bfloat16', 'float16'],
    "Compute dtype; default: a run's config.model.dtype, a Hugging Face folder's dtype (torch_dtype), as transformers.",
)
