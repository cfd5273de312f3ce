"""The plain ``torch.optim`` optimizers, registered as one-pass methods (the baselines).

``optimizer=sgd`` is ``torch.optim.SGD`` with the config's hyperparameters, and so on; the
factory (``sharpbench.optim.factory``) builds them from its ``BASE_OPTIMIZERS``.
"""
from __future__ import annotations

from .registry import MethodInfo, register
from .step_config import AdamStep, AdamWStep, RMSpropStep, SGDStep

PLAIN = (
    # name, label, table order, timed by the bench, typed config (step_config), paper
    ("sgd", "SGD", 0, True, SGDStep, 'SGD with heavy-ball momentum (Polyak, "Some methods of speeding up '
                            'the convergence of iteration methods", 1964)'),
    ("adam", "Adam", 1, False, AdamStep, 'Kingma & Ba, "Adam: A Method for Stochastic Optimization", '
                               'ICLR 2015'),
    ("adamw", "AdamW", 2, True, AdamWStep, 'Loshchilov & Hutter, "Decoupled Weight Decay Regularization", '
                                'ICLR 2019'),
    ("rmsprop", "RMSprop", 3, False, RMSpropStep, "Tieleman & Hinton, Lecture 6.5 of Neural Networks for "
                                     "Machine Learning (Coursera), 2012"),
)

for _name, _label, _order, _bench, _config, _paper in PLAIN:
    register(MethodInfo(name=_name, label=_label, cls=None, paper=_paper, passes=1.0, base=_name,
                        claimed_cost="1",
                        order=_order, bench=_bench, baseline="adamw" if "adam" in _name else "sgd",
                        config=_config, module=__name__))
