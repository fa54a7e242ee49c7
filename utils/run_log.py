"""What train.py and train_vae.py share for running: a TensorBoard writer that needs no TensorFlow, the
SIGTERM / SIGINT flag that turns preemption into "save, then stop", and the two ways a run ends early."""
import os
import signal
import socket
import time

__all__ = ['TBWriter', 'StopFlag', 'UserError', 'Preempted', 'EXIT_PREEMPTED']

EXIT_PREEMPTED = 143        # the exit status after a signal stopped a run that saved its checkpoint first


class UserError(Exception):
    """A problem the user can fix; printed as one sentence."""


class Preempted(Exception):
    """SIGTERM / SIGINT: a checkpoint was saved, the run stops."""


class TBWriter:
    """TensorBoard scalars, written with tensorboard's record writer (``torch.utils.tensorboard`` would import
    TensorFlow when it is installed: seconds of start-up and log noise).  ``purge_step``: on resume, TensorBoard
    hides the events of the previous run from that step on (they are trained and logged again)."""

    def __init__(self, log_dir: str, purge_step=None, flush_secs: float = 30):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter
        self._Event, self._Summary = Event, Summary
        os.makedirs(log_dir, exist_ok=True)
        name = f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.0'
        self._rec = RecordWriter(open(os.path.join(log_dir, name), 'ab'))
        self._flush_secs, self._last_flush = flush_secs, time.time()
        self._write(Event(wall_time=time.time(), file_version='brain.Event:2'))
        if purge_step:
            self._write(Event(wall_time=time.time(), step=int(purge_step),
                              session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event):
        self._rec.write(event.SerializeToString())
        if time.time() - self._last_flush > self._flush_secs:
            self.flush()

    def add_scalar(self, tag: str, value: float, step: int):
        value = self._Summary.Value(tag=tag, simple_value=float(value))
        self._write(self._Event(wall_time=time.time(), step=int(step), summary=self._Summary(value=[value])))

    def add_png(self, tag: str, png: bytes, h: int, w: int, step: int):
        img = self._Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=png)
        value = self._Summary.Value(tag=tag, image=img)
        self._write(self._Event(wall_time=time.time(), step=int(step), summary=self._Summary(value=[value])))

    def flush(self):
        self._rec.flush()
        self._last_flush = time.time()

    def close(self):
        self.flush()
        self._rec.close()


class StopFlag:
    """SIGTERM / SIGINT handler: asks the loop to save and stop at the next step boundary (a second Ctrl-C
    interrupts at once)."""

    def __init__(self):
        self.signame = None

    def __call__(self, signum, frame):
        if self.signame is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name
