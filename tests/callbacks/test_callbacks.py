import time

import numpy as np
import pytest

from tpdiff_lightning.callbacks.throughput import ClipThroughput
from tpdiff_lightning.callbacks.visualize import contact_sheet, gif_bytes


class _Recorder:
    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def test_clip_throughput_logs_clips_per_second():
    cb, module = ClipThroughput(every_n_batches=2), _Recorder()
    batch = {"caption": ["a"] * 8}
    cb.on_train_epoch_start(None, module)
    for i in range(5):
        cb.on_train_batch_start(None, module, batch, i)
        time.sleep(0.02)
    rate = module.logged["data/clips_per_s"]
    assert 50 < rate < 8 / 0.02 * 1.01  # at most 400 clips/s for 8 clips per 20 ms
    with pytest.raises(ValueError, match="every_n_batches=0"):
        ClipThroughput(0)


def test_contact_sheet_and_gif():
    video = np.zeros((4, 8, 8, 3), np.uint8)
    video[2, :, :, 0] = 255
    sheet = np.asarray(contact_sheet([video, video], ["a", "b"], scale=2, label_height=10))
    assert sheet.shape == (2 * (16 + 10), 4 * 16, 3)
    assert sheet[10 + 8, 2 * 16 + 8, 0] == 255 and sheet[10 + 8, 8, 0] == 0  # frame 2 is red, frame 0 is not
    gif = gif_bytes(video)
    assert gif[:6] == b"GIF89a"
