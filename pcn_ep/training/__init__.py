"""Lightning glue, the one place where core meets data: module, CLI, callbacks, loggers, tensor loop. Imports core and data, never tools or experiments."""
