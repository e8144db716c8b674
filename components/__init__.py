"""Kubeflow Pipelines components of redi: one lightweight Python component per pipeline stage.

Each wraps the ``redi.workflow.stages`` (or ``redi.ops.gate`` / ``redi.ops.packaging`` / ``redi.ops.monitoring``)
function that the CLI and DVC also call, with KFP artifacts in and out. Every component names the
project's image (``components.common.REDI_IMAGE``, override with the ``REDI_IMAGE`` environment
variable when compiling; the line's ``pipeline.image_digest`` pins it by digest) as its image and
installs nothing at run time.

Import each component from its module (``from components.gate import gate``). This package's
``__init__`` imports nothing: inside a running step, KFP's executor loads a runtime-only
``kfp.dsl`` without ``dsl.component``, and the step imports ``components.common``, which must not
pull in the decorated modules.
"""

# The stages are the rows of redi.stages.STAGES; each is components/<stage>.py defining the component
# <stage> (tests/test_stages.py checks it). Not imported here, for the reason above.
