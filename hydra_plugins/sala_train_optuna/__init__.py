"""sala-train's Hydra plugins. Hydra instantiates a sweeper only from the ``hydra_plugins``
namespace, so the Optuna sweeper's subclass lives here rather than in ``sala_train``."""
