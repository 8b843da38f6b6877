# A CPU image that serves the demo on ONNX Runtime (no TensorFlow):
#   python -m kit.export                     # writes weights/export/model.onnx and model.json
#   docker build -t car-kit .
#   docker run -p 7860:7860 -v $PWD/weights/export:/app/model car-kit
# It expects the exported model and its model.json in /app/model.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 TF_CPP_MIN_LOG_LEVEL=3 \
    GRADIO_ANALYTICS_ENABLED=False KIT_WORKDIR=/app
WORKDIR /app
COPY requirements-demo.txt ./
RUN pip install --no-cache-dir -r requirements-demo.txt
COPY kit ./kit
RUN useradd --create-home --uid 1000 kit && chown -R kit /app
USER kit
EXPOSE 7860
CMD ["python", "-m", "kit.demo", "--model", "/app/model/model.onnx", "--host", "0.0.0.0", "--port", "7860"]
