"""Default config: a small byte-level Llama-style model on the bundled Shakespeare sample.

Trains to an eval loss well under 2.0 nats per byte in two to four minutes on a 2-core CPU (README.md).
Every field the trainer reads is declared here; override any on the command line, for example
`--config.train.steps=200 --config.model.num_layers=2`.
"""

import importlib.resources

from ml_collections import config_dict


def sample_file(name: str) -> str:
    """Path of a file in the sample corpus that ships inside the `trainer` package."""
    return str(importlib.resources.files('trainer') / 'sample_data' / name)


def get_config() -> config_dict.ConfigDict:
    """Returns the default small-LM config."""
    config = config_dict.ConfigDict()
    config.seed = 0  # seeds parameter init, data order and dropout

    config.model = model = config_dict.ConfigDict()
    model.family = 'llama'  # 'llama' (RMSNorm, RoPE, SwiGLU, GQA) or 'gpt2' (LayerNorm, learned positions, GELU)
    model.num_layers = 4
    model.num_heads = 4  # query heads; must divide d_model when head_dim is 0
    model.num_kv_heads = 2  # key/value heads (grouped-query attention); must divide num_heads
    model.d_model = 128  # residual stream width
    model.head_dim = 0  # width of each attention head; 0 = d_model / num_heads (Qwen and Gemma set their own)
    model.d_ff = 384  # feed-forward hidden width
    model.vocab_size = 256  # token ids the model predicts; >= the tokenizer's vocabulary (256 for 'byte')
    model.vocab_multiple = 1  # embedding rows padded to a multiple of this (e.g. 128 so mesh.tensor divides them)
    model.max_seq_len = 256  # longest sequence the model accepts (size of gpt2's position table)
    model.dtype = 'bfloat16'  # compute dtype: activations and matmul inputs ('float32' for exact comparisons)
    model.param_dtype = 'float32'  # storage dtype of parameters and optimizer state
    # what the backward pass keeps (the rest is recomputed): 'none' (keeps all), 'full', 'dots', 'dots_no_batch',
    # 'attention_mlp_outputs', 'attention_outputs'; kept in host memory: 'offload_attention_outputs',
    # 'dots_no_batch_offloaded' (models.transformer.REMAT_POLICIES)
    model.remat = 'none'
    # Layers unrolled (False) or run by lax.scan (True: compile time independent of depth). Unrolled, this
    # 4-layer model trains faster (7-22% on a CPU, docs/performance.md); deep models want scan.
    model.scan_layers = False
    model.dropout = 0.0  # residual and embedding dropout rate during training
    model.tie_embeddings = False  # share the input embedding with the output projection
    model.use_bias = False  # biases in every linear layer and LayerNorm (GPT-2)
    model.qkv_bias = False  # biases in the query, key and value projections only (Qwen2)
    model.rope_theta = 10_000.0  # RoPE base frequency (llama family)
    model.rope_scaling = 'none'  # RoPE for longer contexts: 'none', 'linear' (positions / factor) or 'llama3'
    model.rope_scaling_factor = 1.0  # 'linear' and 'llama3': how much longer the context gets
    model.rope_low_freq_factor = 1.0  # 'llama3': wavelengths above original_max_len / this are scaled fully
    model.rope_high_freq_factor = 4.0  # 'llama3': wavelengths below original_max_len / this are kept
    model.rope_original_max_len = 8192  # 'llama3': the context length the model was first trained with
    model.sliding_window = 0  # attend to the newest this many tokens only, self included (Mistral); 0 = all
    model.norm_eps = 1e-5  # epsilon inside RMSNorm/LayerNorm
    model.init_std = 0.02  # std of normal weight init; output projections get std / sqrt(2 * num_layers)
    model.attention_impl = 'xla'  # 'xla' (any backend) or 'cudnn' (NVIDIA GPU flash attention)
    # 'cudnn': at most this many documents per row (runs of equal segment ids, padding included); 0 = seq_len,
    # always enough. A smaller bound (say 16) spares cuDNN empty segments; a batch above it is refused.
    model.attention_max_segments = 0
    # The loss reads the logits this many vocabulary ids at a time, never the whole float32 (batch, seq, vocab)
    # array (big vocabularies); 0 = all at once (fastest where the logits fit).
    model.loss_vocab_chunk = 0
    model.head = 'lm'  # 'lm' (next-token logits) or 'classify' (a label per sequence; data.format='classify')
    model.num_classes = 0  # head='classify': how many labels
    model.pool = 'last'  # head='classify': classify from the 'last' token's state or the 'mean' over the text
    # 'sp' (standard) or 'mup' (maximal update parametrization, for Adam): hyperparameters tuned at base_width
    # transfer to wider models. muP scales hidden matrices' init by 1/sqrt(m) and learning rate by 1/m, the
    # logits by 1/m (m = d_model / base_width), and attention by sqrt(base_head_dim) / head_dim.
    model.parametrization = 'sp'
    model.base_width = 0  # muP: the d_model where the hyperparameters were tuned (0 = d_model: muP equals SP)
    model.base_head_dim = 0  # muP: the head_dim of the base model (0 = head_dim)
    model.mup_zero_readout = False  # muP: start the output layer at zero (its 1/m multiplier is kept)
    # muP's weight decay on hidden matrices, whose learning rate is lr / m: 'coupled' (AdamW's lr/m x wd: they
    # decay m times less than at the base) or 'constant' (the mup package's MuAdamW: wd x m, so lr x wd is the
    # base's at every width)
    model.mup_weight_decay = 'coupled'
    # muP's tunable base constants (Tensor Programs V's alpha_input and alpha_output; `python -m trainer.scaling
    # tune_base` searches them at the base width): the embedding output x mup_input_multiplier, the logits x
    # mup_output_multiplier / m. 1.0 = off; only under parametrization='mup'.
    model.mup_input_multiplier = 1.0
    model.mup_output_multiplier = 1.0
    # Depth scaling, CompleteP (Dey et al. 2025): 'none' or 'completep', which multiplies each residual branch by
    # (num_layers / base_depth)^-depth_alpha and initializes the output projections as at base_depth, so a learning
    # rate tuned at base_depth layers transfers to deeper models (with muP, to wider ones too).
    model.depth_scaling = 'none'
    model.base_depth = 0  # completep: the depth where the hyperparameters were tuned (0 = num_layers: no change)
    model.depth_alpha = 1.0  # completep: 1.0 (CompleteP) or 0.5 (the 1/sqrt(depth) rule); in [0.5, 1]

    # LoRA (Hu et al. 2021): low-rank adapters beside the chosen projections; only they (and a classifier
    # head) are trained and have optimizer state. rank 0 = full fine-tuning.
    config.lora = lora = config_dict.ConfigDict()
    lora.rank = 0  # adapter rank r; 0 = no adapters
    lora.alpha = 16.0  # adapter updates are scaled by alpha / rank
    lora.dropout = 0.0  # dropout on the adapters' inputs while training
    lora.targets = 'q,k,v,o'  # comma-separated projections: q, k, v, o (attention), gate, up, down (MLP)
    lora.base_dtype = 'bfloat16'  # storage dtype of the frozen base weights ('' = model.param_dtype)

    config.data = data = config_dict.ConfigDict()
    data.train_files = sample_file('train/*.txt')  # comma-separated paths, globs or fsspec URLs (gs://, s3://, hf://)
    data.eval_files = sample_file('eval/*.txt')  # the same; '' disables eval
    data.mixture = ()  # ((pattern, weight), ...): weighted sources instead of train_files; () = train_files
    # 'auto' (by extension), 'text', 'jsonl', 'parquet' or 'arrayrecord' (pre-tokenized) for language modeling;
    # 'sft': JSON lines of {prompt, completion} or {messages: [{role, content}, ...]}, the loss on the answers only;
    # 'classify': JSON lines of {text, label} for model.head='classify'
    data.format = 'auto'
    data.text_field = 'text'  # JSON-lines field / Parquet column holding the text
    data.prompt_field = 'prompt'  # 'sft': the field the model reads
    data.completion_field = 'completion'  # 'sft': the field it learns to write
    data.messages_field = 'messages'  # 'sft': the field of a chat (rendered with the tokenizer's chat template)
    data.label_field = 'label'  # 'classify': the field holding the label, a class index or a name
    data.class_names = ''  # 'classify': comma-separated names of the classes, in index order ('' = indices)
    data.sample_by = (
        'paragraph'  # text files: a document is a 'line', a 'paragraph' (blank-line separated) or a 'document' (file)
    )
    data.max_document_bytes = 1 << 20  # longer text documents are read in pieces of this size, each its own document
    data.tokenizer = 'byte'  # 'byte' (UTF-8 bytes, ids 0-255), a tokenizers .json file or a SentencePiece .model file
    data.eos_token = ''  # end-of-document token of a tokenizer file; '' = its own or a common one
    data.seq_len = 128  # tokens per training sequence; <= model.max_seq_len
    data.shuffle_buffer = 2048  # packed rows mixed by a window shuffle (train only); 0 or 1 = off
    # The global batch is cut into this many independent streams, each reading its own share of the files and
    # filling fixed rows; 0 = gcd(global_batch_size, 8). The data order depends on it (never on the devices or
    # processes): keep it for the whole run. A process runs the streams of its rows, so more streams than
    # processes spares each process data work (docs/data.md).
    data.num_streams = 0
    # Resume from a checkpoint saved with another num_streams: False refuses (naming the count that continues
    # it exactly); True starts the data order over, so documents already trained on come again.
    data.restart_order = False
    data.num_workers = 0  # grain worker processes per stream; 0 = one background thread per stream
    data.prefetch_batches = 16  # batches buffered ahead of the device (per worker); they are small

    config.train = train = config_dict.ConfigDict()
    train.steps = 600  # optimizer steps in the whole run
    train.global_batch_size = 32  # sequences per optimizer step, summed over all devices and hosts
    train.grad_accum_steps = 1  # micro-batches per step; each is global_batch_size / grad_accum_steps
    train.learning_rate = 3e-3  # peak learning rate
    train.warmup_steps = 50  # linear warmup from 0 to learning_rate
    train.lr_schedule = 'cosine'  # after warmup: 'cosine', 'linear', 'constant' or 'wsd' (warmup-stable-decay)
    train.min_lr_ratio = 0.1  # final learning rate as a fraction of the peak (cosine, linear, wsd)
    train.wsd_decay_fraction = 0.2  # wsd only: fraction of steps spent in the final linear decay
    train.weight_decay = 0.1  # AdamW decoupled weight decay; never on norms and biases
    train.decay_embeddings = False  # apply weight decay to the token and position embeddings too
    # Parameter roles: ((regex, trainable, lr_multiplier, weight_decay_multiplier), ...). The first regex found
    # in a parameter's path ('blocks/attention/wq_DNH', 'embedding_VD', ...) decides; these come before the
    # built-in roles (no decay on norms, biases and embeddings; LoRA trains its adapters and freezes the rest).
    train.param_roles = ()
    train.b1 = 0.9  # AdamW first-moment decay
    train.b2 = 0.95  # AdamW second-moment decay
    train.eps = 1e-8  # AdamW epsilon
    # 'adamw', or 'muon': Muon (momentum orthogonalized by Newton-Schulz) for the hidden matrices (attention
    # q/k/v/o, MLP gate/up/down), AdamW with the settings above for the rest (embeddings, output head, norms,
    # biases, a classifier head, LoRA adapters). Learning rate, schedule and weight decay carry over from AdamW.
    train.optimizer = 'adamw'
    train.muon_momentum = 0.95  # muon: Nesterov momentum
    train.muon_ns_steps = 5  # muon: Newton-Schulz iterations (the quintic of Jordan et al. 2024)
    train.muon_rms_scale = 0.2  # muon: updates x this x sqrt(max(fan_in, fan_out)): AdamW's RMS (Moonlight)
    train.grad_clip = 1.0  # clip gradients to this global norm; 0 disables
    train.log_every = 25  # steps between metric fetches (console, metrics.jsonl, TensorBoard)
    train.eval_every = 200  # steps between evals; 0 evaluates only at the end
    train.eval_steps = 8  # batches of global_batch_size sequences per eval
    train.peak_flops_per_device = 0.0  # FLOP/s for MFU; 0 = look up the accelerator, or measure on CPU
    # `python -m trainer` adds XLA's GPU flags for compute/communication overlap and collective combining to
    # XLA_FLAGS (trainer/runtime/xla_flags.py; flags already in XLA_FLAGS keep their values); False = leave it alone
    train.xla_gpu_flags = True
    # A jax.profiler trace of profile_steps steps from step profile_start_step (1-based) on, written under
    # <workdir>/tensorboard/plugins/profile/ for TensorBoard's profile plugin and Perfetto; 0 steps = off
    train.profile_start_step = 10
    train.profile_steps = 0

    # Where metrics go besides metrics.jsonl and TensorBoard (which are always written)
    config.logging = logging = config_dict.ConfigDict()
    # Weights & Biases (pip install -e '.[wandb]'): the project to log to; '' = off. One W&B run per workdir:
    # a resumed run continues the same run id. Only process 0 logs. WANDB_MODE=offline logs to disk only.
    logging.wandb_project = ''
    logging.wandb_entity = ''  # team or user; '' = your default entity
    logging.wandb_run_name = ''  # '' = the workdir's name
    logging.wandb_tags = ''  # comma-separated tags

    config.checkpoint = checkpoint = config_dict.ConfigDict()
    checkpoint.every_steps = 200  # save every this many steps (0 = only by time and at the end)
    checkpoint.every_minutes = 0.0  # also save when this many minutes passed (checked at log steps); 0 = off
    checkpoint.keep = 3  # newest checkpoints kept in <workdir>/checkpoints
    checkpoint.keep_every_steps = 0  # also keep every checkpoint whose step is a multiple of this, for good (0 = off)
    checkpoint.restore_from = ''  # a new run starts from this checkpoint (or newest in this folder); '' = from scratch
    checkpoint.restore_params_only = True  # restore_from: params only (fresh optimizer, step 0), or the whole state

    config.mesh = mesh = config_dict.ConfigDict()
    mesh.data = 1  # pure data parallelism (replicated parameters); usually across hosts
    mesh.fsdp = -1  # data parallelism with sharded parameters and optimizer state; -1 = all remaining devices
    mesh.tensor = 1  # tensor parallelism over heads, MLP width and vocabulary; keep within a host
    # Logical axis -> mesh axes. The model names every parameter and activation axis; the first rule
    # for a name whose mesh axes are not already used by that array applies; no rule = replicated.
    mesh.rules = (
        ('activation_batch', ('data', 'fsdp')),
        ('activation_length', None),
        ('activation_embed', None),
        ('activation_heads', 'tensor'),
        ('activation_mlp', 'tensor'),
        ('activation_vocab', 'tensor'),
        ('layers', None),
        ('embed', 'fsdp'),
        ('vocab', 'tensor'),
        ('heads', 'tensor'),
        ('kv_heads', 'tensor'),
        ('mlp', 'tensor'),
        ('head_dim', None),
        ('norm', None),
        ('position', None),
    )
    return config
