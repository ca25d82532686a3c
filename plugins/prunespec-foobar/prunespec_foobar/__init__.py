"""prunespec plugin: the custom pruning method of PyTorch's pruning tutorial.

``FooBarPruningMethod`` below is the tutorial's class, unchanged: a plain
``torch.nn.utils.prune.BasePruningMethod`` subclass that prunes every other entry of a tensor. The
``prunespec_register_methods`` hook registers it under the name ``foobar``, so a spec can say::

    rules:
      - select: {names: [fc3], params: [bias]}
        method: foobar
"""

from prunespec import hookimpl
from torch.nn.utils import prune

__all__ = ["FooBarPruningMethod", "foobar_unstructured", "prunespec_register_methods"]


# The tutorial's class, character for character (hence no reformatting).
# fmt: off
class FooBarPruningMethod(prune.BasePruningMethod):
    """Prune every other entry in a tensor
    """
    PRUNING_TYPE = 'unstructured'

    def compute_mask(self, t, default_mask):
        mask = default_mask.clone()
        mask.view(-1)[::2] = 0
        return mask
# fmt: on


def foobar_unstructured(module, name):
    """Prunes tensor corresponding to parameter called `name` in `module`
    by removing every other entry in the tensors.
    Modifies module in place (and also return the modified module)
    by:
    1) adding a named buffer called `name+'_mask'` corresponding to the
    binary mask applied to the parameter `name` by the pruning method.
    The parameter `name` is replaced by its pruned version, while the
    original (unpruned) parameter is stored in a new parameter named
    `name+'_orig'`.

    Args:
        module (nn.Module): module containing the tensor to prune
        name (string): parameter name within `module` on which pruning
                will act.

    Returns:
        module (nn.Module): modified (i.e. pruned) version of the input
            module

    Examples:
        >>> m = nn.Linear(3, 4)
        >>> foobar_unstructured(m, name='bias')
    """
    FooBarPruningMethod.apply(module, name)
    return module


@hookimpl
def prunespec_register_methods(register):
    # The tutorial's class is a plain torch method: its constructor takes no arguments, so it has no
    # options and no amount; prunespec only needs a name for it (the summary is its docstring's first line).
    register(FooBarPruningMethod, name="foobar")
