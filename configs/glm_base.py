"""gLM exactly as the original `train.py` builds it (Hwang et al. 2024), trained as it was.

Copy this file and edit it, or override any field:
    glm-jax train --config configs/glm_base.py --config.train.batch_size=256
"""
import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
    model = ml_collections.ConfigDict()
    model.emb_dim = 1281                # ESM2-650M mean embedding (1280) + orientation feature
    model.hidden_size = 1280
    model.num_layers = 19
    model.num_heads = 10
    model.intermediate_size = 3072      # RobertaConfig default: the original never sets it
    model.max_position_embeddings = 512  # default: the original misspells the key -> 1023 distance rows
    model.position_embedding_type = "relative_key_query"  # or "relative_key", "none"
    model.type_vocab_size = 1
    model.num_pc = 100                  # label size: 99 whitened PCs + orientation
    model.num_pred = 4                  # hypotheses per masked gene
    model.layer_norm_eps = 1e-12
    model.hidden_dropout = 0.1
    model.attention_dropout = 0.1
    model.initializer_range = 0.02
    model.max_genes = 30                # genes per contig window
    model.compute_dtype = "float32"     # "bfloat16": matmuls in bf16; softmax, LayerNorm, loss stay fp32
    model.param_dtype = "float32"       # master weights
    model.scan_layers = True            # lax.scan over the layer stack (fast compile at depth)
    model.remat_policy = "none"         # "none" | "full" | "dots" | "dots_no_batch"
    return model


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = get_model_config()

    config.objective = ml_collections.ConfigDict()
    config.objective.mask_prob = 0.15
    config.objective.mask_value = -1.0
    config.objective.label_clip = 10.0
    config.objective.prob_loss_weight = 1e-4
    # "all_positions": the original's MSE/CE means over every position, unmasked ones zeroed.
    # "masked_genes": means over masked genes only (loss scale independent of the mask rate).
    config.objective.reduction = "all_positions"

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-4
    config.optimizer.schedule = "warmup_constant"  # | "warmup_cosine" | "warmup_linear"
    config.optimizer.warmup_steps = 5000
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-6
    config.optimizer.weight_decay = 0.0
    # False: transformers.AdamW, the original's (eps added to sqrt(v) before bias correction);
    # True: optax / torch.optim.AdamW (eps after bias correction).
    config.optimizer.eps_after_bias_correction = False
    # The original calls clip_grad_value_ after optimizer.step(): it never changes an update.
    config.optimizer.grad_clip_norm = 0.0   # > 0: clip by global norm before the update
    config.optimizer.grad_clip_value = 0.0  # > 0: clip each gradient element before the update

    config.train = ml_collections.ConfigDict()
    config.train.seed = 0
    config.train.batch_size = 1000          # contigs per optimizer step (global)
    config.train.accumulation_steps = 1     # microbatches per step (lax.scan inside the step)
    config.train.num_steps = 1_296_960      # the paper's run
    config.train.log_every = 100
    config.train.eval_every = 10_000
    config.train.eval_batches = 10
    config.train.checkpoint_every = 10_000
    config.train.keep_checkpoints = 3

    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1                   # -1: all devices not used by the other axes
    config.mesh.fsdp = 1
    config.mesh.tensor = 1

    config.data = ml_collections.ConfigDict()
    config.data.train_pattern = ""          # TFRecord shards, e.g. "shards/train-*.tfrecord"
    config.data.eval_pattern = ""
    config.data.shuffle_buffer = 10_000
    return config
