"""One torch thread for the whole suite: the tiny models here gain nothing from threads, and on a busy
2-core machine OpenMP spin-waiting made small eigensolves hundreds of times slower."""

import torch

torch.set_num_threads(1)
