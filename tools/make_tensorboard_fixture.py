"""The TensorBoard fixture (tests/fixtures/tensorboard/): an event file written by
TensorBoard's own record writer and protocol buffers (the PyPI `tensorboard` package,
no TensorFlow), holding the records tests/tensorboard.rs writes with sidscript's
EventWriter at the same wall time: the file version, two scalars at step 3, and
tiny.png as an image at step 7. The test compares the two files byte for byte; this
script also reads the fixture back with TensorBoard's EventAccumulator.

    /work/torchvenv/bin/python tools/make_tensorboard_fixture.py
"""
import os

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

HERE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tensorboard")
WALL = 1.5
png = open(os.path.join(HERE, "tiny.png"), "rb").read()
im = Image.open(os.path.join(HERE, "tiny.png"))

path = os.path.join(HERE, "expected.tfevents")
with open(path, "wb") as f:
    w = RecordWriter(f)
    w.write(event_pb2.Event(wall_time=WALL, step=0, file_version="brain.Event:2").SerializeToString())
    values = [summary_pb2.Summary.Value(tag="train/loss", simple_value=0.25),
              summary_pb2.Summary.Value(tag="train/k", simple_value=2.0)]
    w.write(event_pb2.Event(wall_time=WALL, step=3, summary=summary_pb2.Summary(value=values)).SerializeToString())
    image = summary_pb2.Summary.Image(height=im.height, width=im.width, colorspace=len(im.getbands()),
                                      encoded_image_string=png)
    values = [summary_pb2.Summary.Value(tag="samples", image=image)]
    w.write(event_pb2.Event(wall_time=WALL, step=7, summary=summary_pb2.Summary(value=values)).SerializeToString())

ea = EventAccumulator(HERE)
ea.Reload()
assert [s.value for s in ea.Scalars("train/loss")] == [0.25]
assert [(i.step, i.width, i.height) for i in ea.Images("samples")] == [(7, im.width, im.height)]
print(f"written {path} ({os.path.getsize(path)} bytes); read back: {ea.Tags()['scalars']}, {ea.Tags()['images']}")
