"""The scoring wing: numbers from predictions, as the field and the 2022 Challenge define them. No Ignite.

Owns the field's scores as plain numpy functions (`scores`), the Challenge's own scores computed exactly as
its official evaluator does (`challenge`), the Present/Unknown/Absent and outcome decisions it rewards
(`decision`), and window -> recording -> patient predictions with the thresholds that cut them
(`predictions`).

May import core and data (records, a patient's labels; model sits below it too, but no score needs a model),
the standard library, numpy and scipy; never a wing after it (runs, training, use, experiments).
"""
