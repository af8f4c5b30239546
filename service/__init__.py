"""The front ends of genserve (`genserve.service`): protocols, operations, the server's assembly, the command."""
