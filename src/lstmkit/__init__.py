"""lstmkit: ``torch.nn.LSTM``, exactly, with the recurrence implemented by lstmkit.

``lstmkit.LSTM`` and ``lstmkit.LSTMCell`` take the same arguments, hold the same parameters and
return the same results as their torch counterparts; ``state_dict``s load both ways.
"""

from lstmkit import states
from lstmkit.explain import explain
from lstmkit.modules import LSTM, LSTMCell
from lstmkit.spec import LSTMSpec
from lstmkit.streaming import Stream

__all__ = ["LSTM", "LSTMCell", "LSTMSpec", "Stream", "explain", "states"]
__version__ = "0.1.0"
