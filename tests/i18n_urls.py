"""A URLconf under i18n_patterns without a prefix for the default language."""

from django.conf.urls.i18n import i18n_patterns
from django.http import HttpResponse
from django.urls import path

from django_comet import defer_in_time, deferred_view


def page(request):
    target = request.GET.get("to", "/st/")
    return defer_in_time(HttpResponse(f"first({request.LANGUAGE_CODE});"), 0, target)


@deferred_view()
def stage(request, response_prev=None):
    return HttpResponse(f"stage({request.LANGUAGE_CODE})")


urlpatterns = i18n_patterns(path("page/", page), path("st/", stage), prefix_default_language=False)
