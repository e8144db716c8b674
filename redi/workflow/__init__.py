"""The work a line's model goes through: data checks, fitting, evaluation, reports, prediction."""
