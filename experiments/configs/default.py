"""Every training field with its default; teacher.py and student.py inherit this.

Override any field from the command line, e.g. ``--config.student.leads=I,II``,
``--config.teacher.runs=runs/T`` or ``--config.train.epochs=5``.
"""

import ml_collections


def get_config(arg=None):
    del arg
    config = ml_collections.ConfigDict()
    config.seed = 0  # init, data order, crops, dropout and augmentation draws
    # bce | kd | mkd | clt | mvkt (see mvkt/step.py); configs/teacher.py trains the 12-lead teacher.
    config.method = "bce"
    # Which group below describes the net being trained: "student" (the student, or a
    # BCE baseline) or "teacher" (teacher.py: the 12-lead teacher itself).
    config.trains = "student"

    # Where a student's targets come from (mvkt/teachers.py), and the net of a teacher run.
    config.teacher = ml_collections.ConfigDict()
    # Finished teacher run folders, needed by kd/mkd/clt/mvkt; two or more: an ensemble
    # (mean logits), or with cross_fit the teachers of parts of the training folds.
    # Command line: --config.teacher.runs=runs/T (repeat the flag, or "A,B", for several).
    config.teacher.runs = ()
    # runs: the folders above; other sources are registered with mvkt.teachers.register_source.
    config.teacher.source = "runs"
    # Precompute the teacher's outputs: for the fixed crops, or (random crops) for a grid of
    # crop starts every cache_stride_seconds (e.g. 0.25), from which random crops are drawn.
    config.teacher.cache = False
    config.teacher.cache_stride_seconds = 0.0  # > 0: cache grid step for random crops
    # Cross-fitted targets: runs lists teachers trained on parts of this run's training
    # folds; each record's targets come from the teachers that never saw its fold.
    config.teacher.cross_fit = False
    config.teacher.allow_unfinished = False  # distil from a teacher that stopped early (warned)
    # The net when this run trains the teacher (config.trains = "teacher").
    config.teacher.arch = "resnet1d_wang"
    config.teacher.width_mult = 1.0  # channel width multiplier of a teacher run
    config.teacher.leads = "all"  # a teacher run's leads ("I,II,V2" for a teacher assistant)
    config.teacher.dtype = "float32"  # bfloat16 for GPU/TPU compute

    config.data = ml_collections.ConfigDict()
    config.data.dir = ""  # shards written by data_prep
    config.data.crop_seconds = 2.5  # as the PTB-XL benchmark; 10.0 = full record as the authors
    config.data.random_crop = True  # False: every record cropped at its start
    config.data.eval_stride_fraction = 0.5  # sliding-window stride = half a window
    # Cross-validation rounds: folds of each split, "1,2" ("" = the shards' own splits).
    # When set, the standardisation is re-fitted on the train folds.
    config.data.train_folds = ""
    config.data.val_folds = ""  # see train_folds
    config.data.test_folds = ""  # see train_folds

    # The student's net (config.trains = "student").
    config.student = ml_collections.ConfigDict()
    config.student.arch = "resnet1d_wang"  # xresnet1d18/34/50/101 | resnet1d_wang | fcn_wang | inception1d
    config.student.width_mult = 1.0  # channel width multiplier
    config.student.leads = "I"  # "I", "I,II,V2" or "all"
    config.student.dtype = "float32"  # bfloat16 for GPU/TPU compute

    # Loss weights (MVKT-ECG defaults) and temperatures.
    config.alpha = 1.0  # weight of the MKD (or KD) term
    config.beta = 0.8  # weight of the CLT term
    config.mkd_temperature = 1.0  # T of MKD (method mkd, mvkt)
    config.kd_temperature = 4.0  # T of Hinton KD (method kd)

    config.mkd_class_weights = ""  # "CD:1,HYP:0" (or a dict): per-class MKD weights (unlisted classes 1)

    # Transforms of the 12-lead crop inside the step, identical for teacher and student
    # (function matching; needs the online teacher), and lead dropout for teachers.
    config.augment = ml_collections.ConfigDict()
    config.augment.mixup_alpha = 0.0  # > 0: mixup between records, weight ~ Beta(a, a)
    config.augment.amplitude_scale_std = 0.0  # gain exp(N(0, s)) per record and lead
    config.augment.noise_std = 0.0  # Gaussian noise, standardised units
    config.augment.baseline_wander = 0.0  # amplitude of a random 0.05-0.5 Hz sinusoid
    config.augment.lead_dropout = 0.0  # probability of zeroing each lead not in lead_dropout_keep
    config.augment.lead_dropout_keep = ""  # leads never dropped, e.g. "I" (the student's)
    # Wearable corruptions of the trained net's input only (a frozen teacher sees the clean crop):
    # real NSTDB noise from the training half of each noise record (mvkt/noise.py), reversed
    # electrodes, contact loss. Each is a probability per record.
    config.augment.nstdb_noise = 0.0  # add bw/em/ma noise at an SNR uniform in [min, max] dB
    config.augment.nstdb_snr_min_db = 0.0  # lowest SNR (dB) of the NSTDB noise
    config.augment.nstdb_snr_max_db = 24.0  # highest SNR (dB) of the NSTDB noise
    config.augment.nstdb_dir = ""  # NSTDB records (bw, em, ma); "" = the excerpt in data_prep/samples/nstdb
    config.augment.polarity_flip = 0.0  # invert the trace
    config.augment.contact_loss = 0.0  # a flat stretch of 0.5-2 s

    config.clt = ml_collections.ConfigDict()
    config.clt.variant = "memory_bank"  # memory_bank (CRD, paper) | in_batch (global-batch InfoNCE)
    config.clt.dim = 128  # projection dimension of both CLT heads
    config.clt.temperature = 0.07  # InfoNCE temperature
    config.clt.num_negatives = 1024  # K negatives drawn from the memory bank
    config.clt.momentum = 0.5  # memory-bank update momentum
    config.clt.mask_mode = "differs"  # differs | disjoint

    config.train = ml_collections.ConfigDict()
    config.train.epochs = 50  # passes over the training split
    config.train.batch_size = 128  # global batch (divisible by devices and processes)
    config.train.learning_rate = 1e-2  # peak (or base) learning rate
    config.train.weight_decay = 1e-2  # decoupled (adamw) or L2 (adam) weight decay
    config.train.optimizer = "adamw"  # adamw (decoupled weight decay) | adam (L2 in the gradient, as torch Adam)
    config.train.schedule = "onecycle"  # onecycle | cosine | constant | mvkt_official (QINYZz/MVKT-ECG's)
    config.train.grad_clip_norm = 1.0  # global-norm gradient clipping threshold (0: off)
    config.train.log_every_steps = 10  # metrics.jsonl row (and stop check) every N steps
    config.train.keep_checkpoints = 3  # last N checkpoints kept (plus best/)
    # checkpoints/ every N epochs (and at stops and the end); best/ is still saved at every
    # validation that improves. What a preemption costs at most: N epochs, unless SIGTERM.
    config.train.checkpoint_every_epochs = 1
    # > 0: save and stop there (planned interruption); a rerun with the same value does nothing,
    # one without it (or with a later one) continues.
    config.train.stop_at_step = 0
    # Training data on the devices when it fits this many GB per device (-1: automatic, a
    # quarter of a device's memory; 0: always the host loader): the host then sends only
    # record indices and crop starts. Same batches either way (mvkt/dispatch.py).
    config.train.device_data_gb = -1.0
    # Steps per jitted call (a lax.scan): fewer Python dispatches on accelerators. Log,
    # validation, checkpoint and stop points stay where they are with 1.
    config.train.steps_per_dispatch = 1

    config.eval = ml_collections.ConfigDict()
    config.eval.every_epochs = 1  # validate (and keep the best checkpoint) every N epochs
    # Registered evaluators (mvkt/evaluators.py) run at each validation point; val_auc's
    # val_macro_auc selects the best checkpoint.
    config.eval.evaluators = ("val_auc",)
    config.eval.batch_size = 256  # windows per evaluation batch
    config.eval.aggregate = "max"  # window aggregation: max (benchmark) | mean
    config.eval.bootstrap_resamples = 1000  # resamples of every CI
    return config
